#!/usr/bin/env bash
# Set up a development checkout: .venv in the repository root, peftcli with its test extras,
# and the example model and data prepared once in the cache ($PEFTCLI_HOME or ~/.cache/peftcli).
# On a machine without an NVIDIA GPU the CPU build of torch is pinned (constraints/cpu.txt);
# with a GPU, pip's default torch build is used.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints/cpu.txt)
  "${pip[@]}" install --quiet "${constraints[@]}" torch
fi
"${pip[@]}" install --quiet "${constraints[@]}" -e ".[test]"

.venv/bin/python -m peftcli.examples
