#!/usr/bin/env bash
# Every GPU figure of the training benchmarks in one run (about 8 minutes on one H200), as one JSON file:
# ours vs HF Trainer + PEFT (padded and flattened) at the Llama-3.2-1B and Llama-3.1-8B shapes, QLoRA nf4 at 8B,
# and the fsdp2 / zero3 presets with one process on the 1B shape, their adapters checked against HF PEFT.
# Steps, budgets and tolerances: bench/gpu_suite.py. Arguments go to `gpu_suite.py run`:
#
#   bash bench/gpu_suite.sh [--out FILE] [--work DIR] [--dry-run] [--smoke] [--deadline S]
#   bash bench/gpu_suite.sh --smoke --out /tmp/smoke.json      # the whole suite on CPU, tiny shape (minutes)
#
# On the device machine (nvidia-h200: no network, Python 3.12 with torch 2.11 cu130, transformers 5.17, peft,
# accelerate 1.15, tokenizers, safetensors, typer, rich, pyyaml; no datasets, pydantic, bitsandbytes or
# deepspeed, and not peftcli's tested transformers 5.24). peftcli is not pip-installed there: it runs from the
# source tree (PYTHONPATH=repo root; the launch presets are read from peftcli/launch/presets/). Prepare here,
# once, in the repo root (.whl/ is git-ignored; .cache/ folders are too):
#
#   .venv/bin/python bench/gpu_suite.py wheels --dest .whl            # ~27 MiB: gpu_suite.py's WHEELS and
#                                                                     # deepspeed (built), bitsandbytes slimmed
#                                                                     # to its CUDA 13 + CPU libraries
#   .venv/bin/python bench/gpu_suite.py assets --dest bench/.cache/gpu-assets   # SmolLM2 tokenizer + GSM8K, ~4 MiB
#
# then call the device tool's `run` with carry [".whl", "bench/.cache/gpu-assets"], timeout_s 600 and
#
#   bash bench/gpu_suite.sh --assets bench/.cache/gpu-assets --out $OUT/gpu_suite.json
#
# This script installs the carried wheels with pip --no-index --no-deps --target /tmp/site (the README's recipe
# for the device machine) and puts /tmp/site before the image's own packages. torch stays the image's 2.11,
# older than the >=2.13 peftcli declares: a failure from that shows in the JSON, step by step.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # peftcli from the source tree
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# The project's venv where there is one (this machine); the image's python3 on the device machine.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_suite.py run "$@"
