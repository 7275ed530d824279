#!/usr/bin/env bash
# Set up a development checkout: .venv in the repository root, peftcli with its test extras at the tested
# versions (constraints/tested.txt), and the example model and data prepared once in the cache
# ($PEFTCLI_HOME or ~/.cache/peftcli). On a machine without an NVIDIA GPU the CPU build of torch is used
# (constraints/cpu.txt); with a GPU, pip's CUDA build of the locked torch version.
#
# PEFTCLI_UNLOCKED=1 installs from pyproject.toml's ranges instead of the lock (the newest releases that fit).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${PEFTCLI_VENV:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)

lock=constraints/tested.txt
locked_on=$(sed -n 's/^# Made .* on Python \([0-9]*\.[0-9]*\).*/\1/p' "$lock")
have=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
constraints=()
if [ "${PEFTCLI_UNLOCKED:-0}" = 1 ]; then
  echo "PEFTCLI_UNLOCKED=1: installing the newest releases that pyproject.toml allows (not the tested stack)"
elif [ "$have" != "$locked_on" ]; then
  echo "note: $lock was made on Python $locked_on and this is Python $have;" \
    "installing from pyproject.toml's ranges instead (an untested combination)"
else
  constraints=(-c "$lock" --build-constraint "$lock")
fi
# The lock pins pip itself; older pips do not know --build-constraint, so pip goes first, with -c only.
"${pip[@]}" install --upgrade "${constraints[@]:0:2}" pip

if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints+=(-c constraints/cpu.txt)
  "${pip[@]}" install "${constraints[@]}" torch
fi
# setuptools prints an "Editable installation" banner for every editable install; it is not ours to act on.
PYTHONWARNINGS="ignore:Editable installation" "${pip[@]}" install "${constraints[@]}" -e ".[test]"

"$venv/bin/python" -m peftcli.examples
