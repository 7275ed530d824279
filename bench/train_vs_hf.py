"""Side by side: `peft train` vs Hugging Face Trainer + HF PEFT on the same LoRA job.

Both sides get the same tokenized examples (ours prepares them), the same LoRA config (all linear
layers), optimizer, schedule, batch size and number of steps; each runs in a fresh process so peak RSS is
its own. Printed: training-loop seconds (model load excluded), whole-process seconds and peak RSS, with
ratios ours / HF (below 1 means ours is faster or leaner).

    .venv/bin/python bench/train_vs_hf.py --model smollm2 --steps 10
    .venv/bin/python bench/train_vs_hf.py --model tiny --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def recipe_dict(args, out_dir: Path) -> dict:
    from peftcli.examples.assets import cache_dir

    cache = cache_dir()
    if args.model == "tiny":
        model, data, fmt = cache / "models" / "tiny-llama", cache / "data" / "copy" / "train.jsonl", {}
    else:
        model, data = cache / "models" / "SmolLM2-135M-Instruct", cache / "data" / "gsm8k" / "train.jsonl"
        fmt = {"columns": {"prompt": "question", "completion": "answer"}}
    return {
        "model": {"name_or_path": str(model), "dtype": args.dtype},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": {"path": str(data), "format": "prompt_completion", "max_samples": args.samples, **fmt},
            "max_length": args.max_length,
        },
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 2e-4,
            "schedule": "cosine",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "eval_at_start": False,
            "precision": "fp32",
            "log_every": 10_000,
        },
        "output": {"dir": str(out_dir)},
    }


def run_ours(args, work: Path) -> dict:
    from peftcli.recipe.load import validate_recipe_dict
    from peftcli.train.loop import train

    summary = train(validate_recipe_dict(recipe_dict(args, work / "ours"), "bench"))
    return {"seconds": summary["time_s"]}


def run_hf(args, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftcli.data.prepare import prepare_data
    from peftcli.models.load import load_tokenizer
    from peftcli.recipe.load import validate_recipe_dict

    recipe = validate_recipe_dict(recipe_dict(args, work / "hf"), "bench")
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / "hf"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_grad_norm=1.0,
            weight_decay=0.0,
            logging_steps=10_000,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=42,
        ),
        train_dataset=data.train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    result = trainer.train()
    return {"seconds": result.metrics["train_runtime"]}


def child(side: str, args) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    started = time.perf_counter()
    result = (run_ours if side == "ours" else run_hf)(args, work)
    result["process_seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/HF this many times; medians shown")
    parser.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return

    passthrough = [
        f"--model={args.model}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--max-length={args.max_length}",
        f"--samples={args.samples}",
        f"--dtype={args.dtype}",
    ]
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for side in ("ours", "hf"):
            proc = subprocess.run(
                [sys.executable, __file__, *passthrough, "--child", side],
                capture_output=True,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(line[len("RESULT ") :]))

    def median(side: str, key: str) -> float:
        values = sorted(r[key] for r in results[side])
        return values[len(values) // 2]

    print(
        f"LoRA r=16 all-linear, {args.model}, {args.steps} steps x batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.dtype}, {args.rounds} round(s), medians"
    )
    print(f"{'':24}{'peftcli':>12}{'HF Trainer+PEFT':>18}{'ratio':>9}")
    rows = (
        ("seconds", "train loop seconds"),
        ("process_seconds", "whole process seconds"),
        ("peak_rss_mb", "peak RSS MB"),
    )
    for key, label in rows:
        ours, hf = median("ours", key), median("hf", key)
        print(f"{label:24}{ours:12.1f}{hf:18.1f}{ours / hf:9.2f}")


if __name__ == "__main__":
    main()
