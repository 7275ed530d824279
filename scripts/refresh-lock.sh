#!/usr/bin/env bash
# Refresh constraints/tested.txt from an environment in which the lint and the whole suite just passed:
# .venv-latest after a green `make test-latest` (the default), or .venv after a green `make test`.
# Refuses an environment whose packages changed since its green run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv-latest}
green="$venv/green-freeze.txt"
if [ ! -f "$green" ]; then
  echo "error: $venv has no green run on record; run \`make test-latest\` (or \`make test\` for .venv) first" >&2
  exit 2
fi
now=$(mktemp)
trap 'rm -f "$now"' EXIT
"$venv/bin/python" -m pip freeze --all > "$now"
if ! cmp -s "$green" "$now"; then
  echo "error: $venv changed since its green run (packages installed or upgraded); rerun its tests first" >&2
  exit 2
fi
"$venv/bin/python" scripts/lock.py compare constraints/tested.txt "$green"
"$venv/bin/python" scripts/lock.py write "$green" constraints/tested.txt
echo "review with \`git diff constraints/tested.txt\` and commit it"
