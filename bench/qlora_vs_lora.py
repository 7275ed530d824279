"""Side by side: the same LoRA job on a 16-bit base and on a quantized base (QLoRA nf4, optionally int8).

A random-weight Llama of the chosen shape is written once (bf16 safetensors); each variant then runs
`peftcli.train.loop.train` from a recipe in a fresh process, so its peak GPU memory is its own. Printed per
variant: median tokens/s over the steps after warm-up, peak allocated and reserved GPU memory, model load
time, and ratios against the 16-bit run. Everything but model.quantization is identical.

    python bench/qlora_vs_lora.py                       # Llama-3.2-1B shape, seq 2048, batch 4 (needs a GPU)
    python bench/qlora_vs_lora.py --variants bf16,nf4,int8 --steps 20
    python bench/qlora_vs_lora.py --shape llama-8b --batch-size 2    # where the weights dominate memory
    python bench/qlora_vs_lora.py --shape tiny --steps 4  # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B's architecture (1.24B parameters, tied embeddings), random weights.
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.1-8B's architecture (8.0B parameters), random weights: where the base weights dominate memory.
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
    ),
}
QUANTIZATION = {
    "bf16": None,
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "int8": {"bits": 8},
}


def write_base(shape: str, out: Path) -> None:
    """A random-weight Llama of `shape` with the tiny BPE tokenizer, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.examples.tiny import build_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: an 8B model in fp32 is 32 GB
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="1GB")
    build_tokenizer().save_pretrained(out)


def write_data(path: Path, rows: int, words: int) -> None:
    """Plain-text rows of random toy words, each longer than the sequence length once tokenized."""
    import random

    from peftcli.examples.tiny import toy_lines

    vocabulary = sorted({word for line in toy_lines(200) for word in line.split()})
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words))}) + "\n")


def recipe_dict(args, variant: str, base: Path, data: Path, out: Path) -> dict:
    gpu = args.shape != "tiny"
    model = {"name_or_path": str(base), "dtype": "bf16" if gpu else "fp32"}
    if QUANTIZATION[variant] is not None:
        quantization = dict(QUANTIZATION[variant])
        if quantization["bits"] == 4:
            quantization["compute_dtype"] = "bf16" if gpu else "fp32"
        model["quantization"] = quantization
    return {
        "model": model,
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": {"path": str(data), "format": "text"}, "max_length": args.seq},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 2e-4,
            "schedule": "constant",
            "precision": "bf16" if gpu else "fp32",
            "activation_checkpointing": args.checkpointing,
            "optimizer": args.optimizer,
            "eval_at_start": False,
            "log_every": 1,
        },
        "output": {"dir": str(out)},
    }


def run_variant(args) -> None:
    """One variant in this process; prints a JSON line."""
    import torch

    from peftcli.recipe.load import validate_recipe_dict
    from peftcli.train.loop import train

    work = Path(args.work)
    recipe = validate_recipe_dict(
        recipe_dict(args, args.run, work / "base", work / "data.jsonl", work / f"run-{args.run}"), "bench"
    )
    started = time.perf_counter()
    summary = train(recipe)
    whole = time.perf_counter() - started
    records = [json.loads(line) for line in (work / f"run-{args.run}" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r["type"] == "train" and r["step"] > args.warmup]
    cuda = torch.cuda.is_available()
    result = {
        "variant": args.run,
        "tokens_per_s": statistics.median(speeds),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "setup_s": round(whole - summary["time_s"], 1),
        "loop_s": summary["time_s"],
        "first_loss": summary["first_train_loss"],
        "final_loss": summary["final_train_loss"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "quantization": summary["quantization"],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--variants", default="bf16,nf4", help="comma-separated: bf16, nf4, int8")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the speed median")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args()
    args.seq = args.seq or (64 if args.shape == "tiny" else 2048)
    if args.run:
        run_variant(args)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="peftcli-qlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (work / "base" / "config.json").is_file():
        write_base(args.shape, work / "base")
    write_data(work / "data.jsonl", rows=args.batch_size * (args.steps + 1), words=args.seq + 64)
    print(f"base and data written in {time.perf_counter() - started:.1f}s under {work}", flush=True)

    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--run", variant, "--work", str(work), *_passthrough(args)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}", flush=True)
            continue
        results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
        print(json.dumps(results[variant]), flush=True)

    reference = results.get("bf16")
    print(
        f"\nLoRA r=16 all-linear, {args.shape}, seq {args.seq}, batch {args.batch_size}, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}, optimizer {args.optimizer}"
    )
    print(f"{'variant':8} {'tokens/s':>10} {'peak alloc GiB':>15} {'peak reserved':>14} {'speed ×':>8} {'memory ×':>9}")
    for variant, r in results.items():
        speed = r["tokens_per_s"] / reference["tokens_per_s"] if reference else float("nan")
        alloc = r["peak_allocated_gib"]
        memory = alloc / reference["peak_allocated_gib"] if reference and alloc is not None else float("nan")
        alloc_text = f"{alloc:.2f}" if alloc is not None else "-"
        reserved = f"{r['peak_reserved_gib']:.2f}" if r["peak_reserved_gib"] is not None else "-"
        print(f"{variant:8} {r['tokens_per_s']:>10.0f} {alloc_text:>15} {reserved:>14} {speed:>8.2f} {memory:>9.2f}")


def _passthrough(args) -> list[str]:
    flags = ["--shape", args.shape, "--seq", str(args.seq), "--batch-size", str(args.batch_size)]
    flags += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", args.optimizer]
    return flags + ([] if args.checkpointing else ["--no-checkpointing"])


if __name__ == "__main__":
    main()
