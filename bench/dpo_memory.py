"""What preference training costs over SFT: peak RSS and time of a DPO run against SFT runs of the same shape.

DPO's reference is the starting policy swapped in for a no-grad forward (train/preference.py): no second model.
Its batch of B pairs is 2B rows (each pair's chosen and rejected side), so the fair SFT twin trains batches of
2B rows of the same texts; SFT with B rows is shown too. Every run is `peft train` in its own process, on the
quickstart model and GSM8K (pairs: the reference answer chosen, the next question's answer rejected: fine for
measuring cost, not for quality).

    python bench/dpo_memory.py [--pairs 64] [--batch 2] [--steps 8] [--max-length 384] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HOME = Path(os.environ.get("PEFTCLI_HOME", Path.home() / ".cache" / "peftcli"))
MODEL = HOME / "models" / "SmolLM2-135M-Instruct"
GSM8K = HOME / "data" / "gsm8k" / "train.jsonl"


def _pairs(path: Path, count: int) -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: count + 1]]
    with path.open("w") as handle:
        for row, other in zip(rows[:-1], rows[1:], strict=True):
            pair = {"prompt": row["question"], "chosen": row["answer"], "rejected": other["answer"]}
            handle.write(json.dumps(pair) + "\n")


def _recipe(tmp: Path, name: str, pairs: Path, batch: int, args, objective: str) -> Path:
    data = {"path": str(pairs), "format": "preference"}
    if objective == "sft":  # the chosen side as SFT data: the same prompts and answers
        data = {"path": str(pairs), "format": "prompt_completion", "columns": {"completion": "chosen"}}
    recipe = {
        "model": {"name_or_path": str(MODEL), "dtype": "fp32"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "objective": {"name": objective},
        "data": {"train": data, "validation": None, "max_length": args.max_length, "group_by_length": False},
        "training": {"max_steps": args.steps, "batch_size": batch, "learning_rate": 1e-4, "eval_at_start": False,
                     "seed": 0},
        "output": {"dir": str(tmp / name)},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


MEASURE = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start); "
    "sys.stderr.write(done.stderr[-2000:] if done.returncode else '')"
)


def _run(recipe: Path) -> dict:
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "peftcli", "train", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    status, rss_kb, seconds = done.stdout.split()
    if status != "0":
        raise SystemExit(f"{recipe.name} failed:\n{done.stderr}")
    summary = json.loads((Path(yaml.safe_load(recipe.read_text())["output"]["dir"]) / "summary.json").read_text())
    return {"peak_rss_mb": int(rss_kb) / 1024, "wall_s": float(seconds), "loop_s": summary["time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="pairs per DPO batch (B)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dpo-memory-") as scratch:
        tmp = Path(scratch)
        pairs = tmp / "pairs.jsonl"
        _pairs(pairs, args.pairs)
        runs = {
            f"sft, {args.batch} rows": _recipe(tmp, "sft-b", pairs, args.batch, args, "sft"),
            f"sft, {2 * args.batch} rows": _recipe(tmp, "sft-2b", pairs, 2 * args.batch, args, "sft"),
            f"dpo, {args.batch} pairs": _recipe(tmp, "dpo", pairs, args.batch, args, "dpo"),
        }
        started = time.perf_counter()
        results = {name: _run(recipe) for name, recipe in runs.items()}
    dpo, twin = results[f"dpo, {args.batch} pairs"], results[f"sft, {2 * args.batch} rows"]
    ratios = {"rss_dpo_over_sft_same_rows": dpo["peak_rss_mb"] / twin["peak_rss_mb"],
              "loop_dpo_over_sft_same_rows": dpo["loop_s"] / twin["loop_s"]}  # fmt: skip
    if args.json:
        print(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2))
        return
    print(f"{args.steps} steps of SmolLM2-135M fp32 with LoRA r=16, max_length {args.max_length}, {args.pairs} pairs")
    print(f"{'run':<16} {'peak RSS MB':>12} {'loop s':>8} {'wall s':>8}")
    for name, result in results.items():
        print(f"{name:<16} {result['peak_rss_mb']:>12.0f} {result['loop_s']:>8.1f} {result['wall_s']:>8.1f}")
    rss, loop = ratios["rss_dpo_over_sft_same_rows"], ratios["loop_dpo_over_sft_same_rows"]
    total = time.perf_counter() - started
    print(f"dpo / sft with the same rows: peak RSS {rss:.2f}x, loop time {loop:.2f}x (total {total:.0f} s)")


if __name__ == "__main__":
    main()
