#!/usr/bin/env bash
# Drift check: a throwaway venv with the newest release of every dependency, the lint and the whole suite
# run there, and a report of what changed against the lock and which tests break. Leaves .venv and the
# lock alone. When everything passes, `make lock` adopts the versions of this run.
#
# torch stays at constraints/cpu.txt on machines without an NVIDIA GPU: the newest torch on PyPI is a
# CUDA build of several GB. Set PEFTCLI_LATEST_VENV to put the venv elsewhere (default .venv-latest).
set -uo pipefail
cd "$(dirname "$0")/.."

venv=${PEFTCLI_LATEST_VENV:-.venv-latest}
rm -rf "$venv"
# A new venv without the lock: pip resolves the newest release of everything (torch aside, see above).
PEFTCLI_VENV=$venv PEFTCLI_UNLOCKED=1 bash scripts/setup.sh || exit 1
"$venv/bin/python" -m pip freeze --all > "$venv/freeze.txt"

echo
echo "== the newest releases against the lock"
"$venv/bin/python" scripts/lock.py compare constraints/tested.txt "$venv/freeze.txt"

echo
echo "== lint with the newest ruff"
lint=0
"$venv/bin/ruff" check . || lint=1
"$venv/bin/ruff" format --check . || lint=1

echo
echo "== the suite on the newest releases"
"$venv/bin/python" -m pytest -q -ra -p no:cacheprovider --junitxml="$venv/junit.xml"
tests=$?

echo
echo "== drift report"
"$venv/bin/python" - "$venv/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

broken = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    for kind in ("failure", "error"):
        node = case.find(kind)
        if node is not None:
            first = (node.get("message") or "").strip().splitlines()
            broken.append(f"{case.get('classname')}::{case.get('name')}  ({first[0][:140] if first else kind})")
print(f"{len(broken)} test(s) break on the newest releases" + (":" if broken else ""))
for line in broken:
    print("  " + line)
EOF
if [ "$tests" -eq 0 ] && [ "$lint" -eq 0 ]; then
  cp "$venv/freeze.txt" "$venv/green-freeze.txt"
  echo "everything passes on the newest releases: \`make lock\` makes them the tested stack"
  exit 0
fi
[ "$lint" -eq 0 ] || echo "the newest ruff finds lint or format problems (above)"
echo "not lockable: fix what breaks (or skip an oracle that is itself broken, naming the versions), then rerun"
exit 1
