"""Does a TIES combination of two LoRA adapters keep both skills? Two short runs of the quickstart model on two
toy tasks (reverse a list of words; write the words in capitals), then `peft merge A B --combine RULE` into a
merged model, then `peft eval` of base, A, B and the merged model on each task's held-out rows.

    python bench/combine_skills.py [--steps 8] [--rules ties,ties_svd,cat] [--density 0.5] [--json]
    python bench/combine_skills.py --tiny --steps 80      # the tiny random Llama of the tests: seconds

Training and merging are the CLI a user would type, each in its own process; scoring is `peft eval`'s own
function, in this process. The table is each task's validation loss.

One run on a busy 2-core CPU (6 steps of batch 4 per task, rank 8, all-linear), validation loss:

    | base | adapter reverse | adapter upper | ties 1,1 d=0.5 | ties_svd 1,1 d=0.5 | cat 1,1
    reverse | 4.029 | 0.969 | 3.343 | 1.534 | 1.598 | 1.520
    upper   | 2.483 | 1.919 | 0.590 | 0.883 | 0.922 | 0.993

TIES keeps 82% (reverse) and 85% (upper) of what each task's own adapter gained over the base.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HOME = Path(os.environ.get("PEFTCLI_HOME", Path.home() / ".cache" / "peftcli"))
MODEL = HOME / "models" / "SmolLM2-135M-Instruct"
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
TASKS = {
    "reverse": lambda words: ("reverse: " + " ".join(words), " ".join(reversed(words))),
    "upper": lambda words: ("capitals: " + " ".join(words), " ".join(w.upper() for w in words)),
}


def _rows(task: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt, completion = TASKS[task]([rng.choice(WORDS) for _ in range(rng.randint(3, 6))])
        rows.append({"prompt": prompt, "completion": " " + completion})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _peft(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "peftcli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"peft {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _recipe(root: Path, model: Path, task: str, train: Path, args) -> Path:
    recipe = {
        "model": {"name_or_path": str(model), "dtype": "fp32"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": {"path": str(train), "format": "prompt_completion"}, "max_length": 64},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "warmup_steps": 1,
            "seed": 0,
        },  # fmt: skip
        "output": {"dir": str(root / f"run-{task}")},
    }
    path = root / f"{task}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _loss(target: Path, data: Path) -> float:
    """What `peft eval TARGET --data DATA --format prompt_completion` prints as eval_loss (in this process: on a
    busy machine, starting a process per score cost more than the scoring)."""
    from peftcli.serve.score import DataChoice, evaluate_run

    return evaluate_run(target, DataChoice(str(data), "prompt_completion"))["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2.0e-3)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="The tests' tiny random Llama instead of SmolLM2-135M.")
    parser.add_argument("--rules", default="ties,ties_svd,cat")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="combine-skills-") as tmp:
        root = Path(tmp)
        model = MODEL
        if args.tiny:
            from peftcli.examples.tiny import write_tiny_model

            model = write_tiny_model(root / "tiny-model")
        evals, runs = {}, {}
        for seed, task in enumerate(TASKS):
            train = _write(root / f"{task}-train.jsonl", _rows(task, 400, seed))
            evals[task] = _write(root / f"{task}-eval.jsonl", _rows(task, args.eval_rows, 100 + seed))
            _peft("train", str(_recipe(root, model, task, train, args)))
            runs[task] = root / f"run-{task}"
        rows = {"base": {t: _loss(model, evals[t]) for t in TASKS}}
        for task, run in runs.items():
            rows[f"adapter {task}"] = {t: _loss(run, evals[t]) for t in TASKS}
        for rule in args.rules.split(","):
            merged = root / f"merged-{rule}"
            extra = ["--density", str(args.density)] if rule not in ("linear", "cat", "svd") else []
            _peft("merge", *map(str, runs.values()), "--combine", rule, "--weights", "1,1", *extra, "--dtype", "fp32",
                  "-o", str(merged))  # fmt: skip
            name = f"{rule} (weights 1,1" + (f", density {args.density})" if extra else ")")
            rows[name] = {t: _loss(merged, evals[t]) for t in TASKS}
    if args.json:
        print(json.dumps(rows))
        return
    print(f"| validation loss | {' | '.join(TASKS)} |")
    print(f"|---|{'---|' * len(TASKS)}")
    for name, losses in rows.items():
        print(f"| {name} | {' | '.join(f'{losses[t]:.3f}' for t in TASKS)} |")


if __name__ == "__main__":
    main()
