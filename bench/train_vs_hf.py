"""Side by side: `peft train` vs Hugging Face Trainer + HF PEFT on the same LoRA job, over the same examples.

Every side trains one epoch over the same examples (tokenized by peftcli's `prepare_data`, in each side's own
process), with the same LoRA config (r=16, alpha 32, all linear layers, no dropout), AdamW (torch's, not fused),
learning rate and cosine schedule without warm-up, gradient clipping at 1.0 and seed. Batching is each side's
own, so packing (fewer, fuller rows) is compared fairly: throughput counts real tokens (the examples' lengths,
no padding) per second of the training loop. Sides, each in a fresh process (its peak memory is its own):

    ours     peftcli's `train()` with the recipe (--ours-packing/--ours-loss/--ours-compile/--ours-group-by-length
             set those recipe keys; left out, the recipe's defaults apply)
    hf       Trainer + get_peft_model, DataCollatorForSeq2Seq (pads each batch to its longest example)
    hf-flat  Trainer + get_peft_model, DataCollatorWithFlattening: the batch's examples concatenated into one
             row, no attention mask, position_ids restarting at 0 per example. transformers (5.x,
             masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask from restarting
             position_ids only when no attention mask and no KV cache is passed, so use_cache is off; before
             training, a flattened forward is checked against separate forwards of the same examples.

Each side checks its own run and fails loudly (exit status 1, FAILED in the table) unless: the loss falls --
the mean loss of the last quarter of the steps is below that of the first quarter (ceil(steps / 4) steps each,
at least 4 steps; the examples are shuffled, so a quarter's mean is compared rather than single steps) -- and
the gradient norm (before clipping) is finite and non-zero on every step (logging every step: HF through a
TrainerCallback, ours from metrics.jsonl).

Two kinds of job:

  --model tiny|smollm2  (CPU) the example assets: the real SmolLM2-135M-Instruct on GSM8K prompt/completion
                        (loss on the answers), or the tiny random Llama on the copy task.
  --shape llama-1b|llama-8b|tiny  random-weight Llama-3.2-1B / Llama-3.1-8B shapes (bench/qlora_vs_lora.py's
                        SHAPES) written once as bf16 safetensors with SmolLM2's tokenizer (ids stay below its
                        49,152-token vocabulary), trained on plain text (loss on every token) of a realistic mix of
                        lengths: GSM8K problems and answers joined until each example reaches a length drawn
                        log-uniformly between max_length/16 and max_length (128..2048 at the default 2048; seed 0;
                        median about max_length/4). bf16 on --device cuda. --shape tiny uses the cached
                        tiny-llama and its tokenizer (lengths 16..256), runnable on CPU to smoke-test this path.

Figures per side (medians over --rounds; sides alternate): training-loop seconds (model load and data preparation
excluded), real tokens/s over the loop, the same after the first step (warm-up, compilation), whole-process
seconds, peak memory (CPU: peak RSS; CUDA: torch.cuda.max_memory_allocated in the child), steps, first and last
loss, and on CUDA the model FLOP utilisation:

    MFU = model FLOPs / loop seconds / 989e12  (H100/H200 dense bf16 peak)
    model FLOPs of one example of L real tokens, base frozen (no weight gradients for it):
        4 * N_matmul * L                  forward (2N) and input-gradient backward (2N) of every base matmul:
                                          q, k, v, o, gate, up, down of each layer and the lm_head (d x vocab)
      + 6 * N_lora * L                    LoRA: forward, input gradients and weight gradients
      + 6 * layers * d_attn * L^2         causal attention: QK^T and AV forward (2 L^2 d_attn for the causal
                                          half), twice that backward
    Recomputation under activation checkpointing is not counted (model FLOPs, not hardware FLOPs); padding
    and the attention across packed examples that the mask discards are not counted either.

    .venv/bin/python bench/train_vs_hf.py --model smollm2 --samples 32 --batch-size 4
    .venv/bin/python bench/train_vs_hf.py --model smollm2 --ours-packing false --ours-loss full
    .venv/bin/python bench/train_vs_hf.py --device cpu --shape tiny --samples 32
    python bench/train_vs_hf.py --device cuda --shape llama-1b --samples 256 --json /tmp/1b.json
    python bench/train_vs_hf.py --device cuda --shape llama-8b --quant nf4 --samples 64 --sides ours,hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_vs_lora import SHAPES  # noqa: E402  (bench/ is not a package; one definition of the shapes)

SIDES = ("ours", "hf", "hf-flat")
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16_EPS = 2.0**-7  # spacing of bf16 numbers in [1, 2)
SMOLLM2 = "SmolLM2-135M-Instruct"


# --- where things are ------------------------------------------------------------------------------------------


def assets(args) -> dict[str, Path]:
    """The example assets: SmolLM2 (its tokenizer, for the random shapes), GSM8K and tiny-llama.

    --assets points at a folder written by `bench/gpu_suite.py assets` (tokenizer/ and gsm8k.jsonl) on a machine
    without the example cache; by default the cache of `python -m peftcli.examples` is read.
    """
    if args.assets:
        root = Path(args.assets)
        return {"tokenizer": root / "tokenizer", "gsm8k": root / "gsm8k.jsonl", "tiny": root / "tiny-llama"}
    from peftcli.examples.assets import cache_dir

    cache = cache_dir()
    return {
        "tokenizer": cache / "models" / SMOLLM2,
        "gsm8k": cache / "data" / "gsm8k" / "train.jsonl",
        "tiny": cache / "models" / "tiny-llama",
        "smollm2": cache / "models" / SMOLLM2,
        "copy": cache / "data" / "copy" / "train.jsonl",
    }


def base_dir(args) -> Path:
    if args.shape == "tiny":
        return assets(args)["tiny"]
    return Path(args.work) / f"base-{args.shape}"


def shape_data_path(args) -> Path:
    return Path(args.work) / f"data-{args.shape}-{args.max_length}-{args.samples}.jsonl"


def gpu(args) -> bool:
    return args.device == "cuda"


# --- the recipe both sides read ---------------------------------------------------------------------------------


def recipe_dict(args, out_dir: Path) -> dict:
    """The job as a peftcli recipe; the HF sides read its data through peftcli's prepare_data."""
    method = {"name": "lora", "r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": "all-linear"}
    if args.shape:
        model = {"name_or_path": str(base_dir(args)), "dtype": "bf16" if gpu(args) else "fp32"}
        train = {"path": str(shape_data_path(args)), "format": "text"}
        precision = "bf16" if gpu(args) else "fp32"
    else:
        paths = assets(args)
        if args.model == "tiny":
            model = {"name_or_path": str(paths["tiny"]), "dtype": args.dtype}
            train = {"path": str(paths["copy"]), "format": "prompt_completion"}
        else:
            model = {"name_or_path": str(paths["smollm2"]), "dtype": args.dtype}
            train = {"path": str(paths["gsm8k"]), "format": "prompt_completion"}
            train["columns"] = {"prompt": "question", "completion": "answer"}
        train["max_samples"] = args.samples
        precision = "bf16" if args.dtype == "bf16" else "fp32"
    if args.quant == "nf4":
        compute = "bf16" if gpu(args) else "fp32"
        model["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute}
    data: dict = {"train": train, "max_length": args.max_length}
    training: dict = {
        "epochs": 1,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "schedule": "cosine",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "eval_at_start": False,
        "precision": precision,
        "activation_checkpointing": args.activation_checkpointing,
        "log_every": 1,
        "seed": 42,
    }
    # Only the keys asked for: the recipe stays valid on a peftcli without them.
    if args.ours_packing is not None:
        data["packing"] = {"true": True, "false": False}.get(args.ours_packing, args.ours_packing)
    if args.ours_group_by_length is not None:
        data["group_by_length"] = args.ours_group_by_length == "true"
    if args.ours_loss is not None:
        training["cross_entropy"] = args.ours_loss
    if args.ours_compile is not None:
        training["compile"] = args.ours_compile == "true"
    return {"model": model, "method": method, "data": data, "training": training, "output": {"dir": str(out_dir)}}


def hf_recipe(args, out_dir: Path):
    """The recipe without ours-only keys: the HF sides only read its model and data through peftcli."""
    from peftcli.recipe.load import validate_recipe_dict

    raw = recipe_dict(args, out_dir)
    for key in ("packing", "group_by_length"):
        raw["data"].pop(key, None)
    for key in ("cross_entropy", "compile"):
        raw["training"].pop(key, None)
    return validate_recipe_dict(raw, "bench")


# --- the examples of the random-shape jobs ------------------------------------------------------------------------


def length_range(args) -> tuple[int, int]:
    return max(8, args.max_length // 16), args.max_length


def write_shape_data(args) -> None:
    """Plain-text examples of GSM8K problems joined up to lengths drawn log-uniformly (seeded), one per line.

    Lengths are measured with the model's tokenizer (special tokens left out: the text format adds bos/eos, and
    data.max_length truncates, so real lengths are counted again after prepare_data).
    """
    from tokenizers import Tokenizer

    paths = assets(args)
    tokenizer_dir = paths["tiny"] if args.shape == "tiny" else paths["tokenizer"]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    problems = []
    with paths["gsm8k"].open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            problems.append(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n")
    rng = random.Random(0)
    low, high = length_range(args)
    out = shape_data_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for _ in range(args.samples):
            target = round(math.exp(rng.uniform(math.log(low), math.log(high))))
            start, ids = rng.randrange(len(problems)), []
            while len(ids) < target:
                ids += tokenizer.encode(problems[start % len(problems)], add_special_tokens=False).ids
                start += 1
            text = tokenizer.decode(ids[: max(1, target - 2)])  # room for bos and eos
            handle.write(json.dumps({"text": text}) + "\n")


def write_base(args) -> None:
    """A random-weight Llama of the shape, bf16 safetensors, with SmolLM2's tokenizer (run in a child process)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(assets(args)["tokenizer"]))
    out = base_dir(args)
    config = LlamaConfig(
        **SHAPES[args.shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.bfloat16,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: the 8B shape in fp32 is 32 GB
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    partial = out.with_name(out.name + ".part")
    model.save_pretrained(partial, max_shard_size="4GB")
    tokenizer.save_pretrained(partial)
    partial.rename(out)


# --- what one side measures -------------------------------------------------------------------------------------


def model_flops(config: dict, lengths: list[int], rank: int = LORA_R) -> float:
    """Model FLOPs of one LoRA epoch over examples of these lengths (formula in the module docstring)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    q, k = heads * head_dim, kv * head_dim
    # (in, out) of each targeted projection
    shapes = [(d, q), (d, k), (d, k), (q, d), (d, ff), (d, ff), (ff, d)]
    n_matmul = layers * sum(i * o for i, o in shapes) + d * config["vocab_size"]
    n_lora = layers * sum(rank * (i + o) for i, o in shapes)
    tokens = sum(lengths)
    return 4 * n_matmul * tokens + 6 * n_lora * tokens + 6 * layers * q * sum(n * n for n in lengths)


def loss_falls(losses: list[float]) -> tuple[bool, str]:
    """The rule stated in the module docstring."""
    if len(losses) < 4:
        return False, f"only {len(losses)} steps; need at least 4 to compare quarters"
    q = math.ceil(len(losses) / 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    return last < first, f"mean loss of the first {q} steps {first:.4f}, of the last {q} {last:.4f}"


def check_run(losses: list[float], norms: list) -> list[str]:
    """Problems with a side's run (empty: it trained)."""
    problems = []
    falls, how = loss_falls(losses)
    if not falls:
        problems.append(f"loss did not fall: {how}")
    if len(norms) != len(losses):
        problems.append(f"{len(norms)} gradient norms for {len(losses)} steps")
    bad = [(i + 1, n) for i, n in enumerate(norms) if n is None or not math.isfinite(n) or n <= 0]
    if bad:
        problems.append(f"gradient norm missing, non-finite or zero at steps {bad[:5]}")
    if any(not math.isfinite(x) for x in losses):
        problems.append("non-finite loss")
    return problems


def memory_figures(args) -> dict:
    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if gpu(args):
        import torch

        figures["peak_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
        figures["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return figures


def finish_figures(args, result: dict, lengths: list[int], first_step_tokens: int | None) -> dict:
    """Throughput, MFU and the checks, from the loop's time, the steps' losses and norms and the examples."""
    real = sum(lengths)
    loop = result["loop_s"]
    result.update(examples=len(lengths), real_tokens=real, tokens_per_s=real / loop)
    result["steady_tokens_per_s"] = None
    first = result.get("first_step_s")
    if first_step_tokens is not None and first is not None and loop > first and result["steps"] > 1:
        result["steady_tokens_per_s"] = (real - first_step_tokens) / (loop - first)
    config = json.loads((Path(args.model_path) / "config.json").read_text())
    result["model_flops"] = model_flops(config, lengths)
    result["mfu"] = result["model_flops"] / loop / PEAK_BF16_FLOPS if gpu(args) else None
    losses = result["losses"]
    result.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    result["problems"] = result.get("problems", []) + check_run(losses, result["grad_norms"])
    return result


def lengths_of(dataset) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]


# --- ours ---------------------------------------------------------------------------------------------------------


def run_ours(args, work: Path) -> dict:
    from peftcli.data.prepare import prepare_data
    from peftcli.models.load import load_tokenizer
    from peftcli.recipe.load import validate_recipe_dict
    from peftcli.train.loop import train

    recipe = validate_recipe_dict(recipe_dict(args, work / "ours"), "bench")
    summary = train(recipe)
    process_s = time.perf_counter() - args.started
    memory = memory_figures(args)
    records = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    # Counted after the figures above: the same prepare_data the loop ran, for the real lengths.
    lengths = lengths_of(prepare_data(recipe, load_tokenizer(recipe.model)).train)
    result = {
        "loop_s": summary["time_s"],
        "first_step_s": steps[0]["elapsed_s"] if steps else None,
        "steps": len(steps),
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r.get("grad_norm") for r in steps],
        "process_s": process_s,
        "loop_tokens": summary.get("train_tokens"),  # what the loop counted as non-padding tokens
        # how the loop batched and took the loss, where this peftcli reports it
        "ours_facts": {k: summary[k] for k in ("packing", "batches", "cross_entropy", "compile") if k in summary},
        **memory,
    }
    return finish_figures(args, result, lengths, steps[0].get("tokens") if steps else None)


# --- Hugging Face -------------------------------------------------------------------------------------------------


def hf_model(args, recipe):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if gpu(args) else torch.float32
    if not args.shape:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}[args.dtype]
    # On the GPU straight from the checkpoint (the 8B shape need not pass through CPU memory first).
    kwargs: dict = {"dtype": dtype, **({"device_map": {"": 0}} if gpu(args) else {})}
    if args.quant == "nf4":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if gpu(args) else torch.float32,
        )
        kwargs.setdefault("device_map", {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **kwargs)
    model.config.use_cache = False  # also what lets a flattened batch get its block-diagonal mask
    if args.quant == "nf4":  # as HF's QLoRA guide does: norms (and other 16-bit leftovers) to fp32, input grads on
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def check_flattening(model, dataset, device, bf16: bool) -> dict:
    """Logits of a flattened batch (DataCollatorWithFlattening) against each example's own forward.

    `leak_diff` is the same flattened batch with an all-ones attention mask (the examples then see each other):
    how far off a flattened batch would be if the block-diagonal mask were not built.
    """
    import torch
    from transformers import DataCollatorWithFlattening

    examples = [dataset[i] for i in range(min(3, len(dataset)))]
    flat = DataCollatorWithFlattening()(examples)
    model.eval()
    with torch.no_grad():
        ids, positions = flat["input_ids"].to(device), flat["position_ids"].to(device)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        leaked = model(
            input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False
        ).logits.float()
        separate = torch.cat(
            [
                model(input_ids=torch.tensor([e["input_ids"]], device=device), use_cache=False).logits.float()
                for e in examples
            ],
            dim=1,
        )
    model.train()
    scale = float(separate.abs().max())
    # fp32: summation order only; bf16: a few roundings of the hidden state reach the logits at their own scale
    tolerance = (8 * BF16_EPS if bf16 else 1e-4) * max(1.0, scale)
    diff = float((packed - separate).abs().max())
    return {
        "examples": len(examples),
        "max_diff": diff,
        "leak_diff": float((leaked - separate).abs().max()),
        "tolerance": tolerance,
        "ok": diff <= tolerance,
    }


def run_hf(args, work: Path, flat: bool) -> dict:
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from peftcli.data.prepare import prepare_data
    from peftcli.models.load import load_tokenizer

    recipe = hf_recipe(args, work / "hf")
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    model = hf_model(args, recipe)
    device = "cuda" if gpu(args) else "cpu"
    if args.quant != "nf4":  # bitsandbytes placed a quantized model while loading it
        model.to(device)
    result: dict = {"problems": []}
    if flat:
        result["flattening_check"] = check = check_flattening(model, data.train, device, gpu(args))
        if not check["ok"]:
            result["problems"].append(f"flattened logits differ from separate ones: {check}")
    if gpu(args):
        torch.cuda.reset_peak_memory_stats()  # the check's forwards are not part of training

    inner = (
        DataCollatorWithFlattening()
        if flat
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    batch_tokens: list[int] = []

    def collate(features):
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return inner(features)

    class Record(TrainerCallback):
        """Loss and gradient norm of every step, and the loop's clock."""

        def __init__(self):
            self.began, self.ends, self.losses, self.norms = None, [], [], []

        def on_train_begin(self, args_, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if gpu(args):
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter() - self.began)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.norms.append(None if logs.get("grad_norm") is None else float(logs["grad_norm"]))

    record = Record()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / "hf"),
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_grad_norm=1.0,
            weight_decay=0.0,
            optim="adamw_torch",  # torch's AdamW as peftcli uses it (HF's default on CUDA is the fused one)
            bf16=gpu(args) or (not args.shape and args.dtype == "bf16"),
            gradient_checkpointing=args.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not gpu(args),
            dataloader_num_workers=0,
            seed=42,
        ),
        train_dataset=data.train,
        data_collator=collate,
        callbacks=[record],
    )
    trainer.train()
    process_s = time.perf_counter() - args.started
    result.update(
        loop_s=record.ends[-1] if record.ends else float("nan"),
        first_step_s=record.ends[0] if record.ends else None,
        steps=len(record.ends),
        losses=record.losses,
        grad_norms=record.norms,
        process_s=process_s,
        **memory_figures(args),
    )
    return finish_figures(args, result, lengths_of(data.train), batch_tokens[0] if batch_tokens else None)


# --- processes ----------------------------------------------------------------------------------------------------


def child(side: str, args) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    args.model_path = recipe_dict(args, work)["model"]["name_or_path"]
    result = run_ours(args, work) if side == "ours" else run_hf(args, work, flat=side == "hf-flat")
    result["side"] = side
    print("RESULT " + json.dumps(result), flush=True)
    if result["problems"]:
        sys.exit(f"{side}: " + "; ".join(result["problems"]))


def passthrough(args) -> list[str]:
    flags = [
        f"--device={args.device}",
        f"--batch-size={args.batch_size}",
        f"--max-length={args.max_length}",
        f"--samples={args.samples}",
        f"--lr={args.lr}",
        f"--quant={args.quant}",
    ]
    flags += [f"--shape={args.shape}", f"--work={args.work}"] if args.shape else [f"--model={args.model}"]
    flags += [f"--dtype={args.dtype}"]
    if args.assets:
        flags.append(f"--assets={args.assets}")
    if args.activation_checkpointing:
        flags.append("--activation-checkpointing")
    for name in ("ours_packing", "ours_loss", "ours_compile", "ours_group_by_length"):
        value = getattr(args, name)
        if value is not None:
            flags.append(f"--{name.replace('_', '-')}={value}")
    return flags


def run_child(args, side: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, *passthrough(args), "--child", side], capture_output=True, text=True, env=env
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"side": side, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
    result = json.loads(line[len("RESULT ") :])
    if proc.returncode != 0 and not result.get("problems"):
        result["error"] = f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return result


def prepare_inputs(args) -> None:
    """The random base (once per --work) and the examples of a --shape job."""
    if not args.shape:
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.shape != "tiny" and not (base_dir(args) / "config.json").is_file():
        started = time.perf_counter()
        # In a child: the parent never holds GPU memory that the measured sides would then lack.
        subprocess.run([sys.executable, __file__, *passthrough(args), "--write-base"], check=True)
        print(f"wrote the random {args.shape} base in {time.perf_counter() - started:.0f}s", flush=True)
    write_shape_data(args)


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def summarize(args, results: dict[str, list[dict]]) -> dict:
    """Medians per side over the rounds, and ratios ours / each HF side."""
    keys = (
        "loop_s",
        "tokens_per_s",
        "steady_tokens_per_s",
        "process_s",
        "peak_rss_mb",
        "peak_alloc_mb",
        "mfu",
        "steps",
        "first_loss",
        "last_loss",
        "real_tokens",
        "examples",
    )
    medians = {}
    for side, runs in results.items():
        good = [r for r in runs if "loop_s" in r]
        medians[side] = {k: median([r.get(k) for r in good]) for k in keys} if good else {}
    ratios = {}
    ours = medians.get("ours", {})
    for other in ("hf", "hf-flat"):
        theirs = medians.get(other, {})
        ratios[f"ours/{other}"] = {
            k: ours[k] / theirs[k] for k in keys if ours.get(k) is not None and theirs.get(k) not in (None, 0)
        }
    return {"medians": medians, "ratios": ratios}


def print_table(args, results: dict[str, list[dict]], summary: dict) -> None:
    sides = list(results)
    medians, ratios = summary["medians"], summary["ratios"]
    job = f"--shape {args.shape}" if args.shape else f"--model {args.model} ({args.dtype})"
    ours_keys = [f"{k}={getattr(args, k)}" for k in ("ours_packing", "ours_loss", "ours_compile") if getattr(args, k)]
    print(
        f"\nLoRA r={LORA_R} all-linear, {job}, {args.device}, quant {args.quant}, one epoch over {args.samples} "
        f"examples, batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.rounds} round(s), medians" + (f"; ours: {', '.join(ours_keys)}" if ours_keys else "")
    )
    memory_key, memory_label = ("peak_alloc_mb", "peak GPU alloc MB") if gpu(args) else ("peak_rss_mb", "peak RSS MB")
    rows = [
        ("loop_s", "train loop s", "{:.2f}"),
        ("tokens_per_s", "real tokens/s", "{:.0f}"),
        ("steady_tokens_per_s", "tokens/s after step 1", "{:.0f}"),
        ("process_s", "whole process s", "{:.1f}"),
        (memory_key, memory_label, "{:.0f}"),
        ("steps", "steps", "{:.0f}"),
        ("first_loss", "first loss", "{:.4f}"),
        ("last_loss", "last loss", "{:.4f}"),
        ("real_tokens", "real tokens", "{:.0f}"),
    ]
    if gpu(args):
        rows.append(("mfu", "MFU", "{:.3f}"))
    ratio_names = [name for name in ("ours/hf", "ours/hf-flat") if name.split("/")[1] in sides and "ours" in sides]
    print(f"{'':24}" + "".join(f"{s:>12}" for s in sides) + "".join(f"{n:>14}" for n in ratio_names))
    for key, label, fmt in rows:
        cells = []
        for side in sides:
            value = medians[side].get(key)
            cells.append(f"{fmt.format(value) if value is not None else '-':>12}")
        ratio_cells = []
        for name in ratio_names:
            value = ratios[name].get(key)
            ratio_cells.append(f"{f'{value:.2f}' if value is not None else '-':>14}")
        print(f"{label:24}" + "".join(cells) + "".join(ratio_cells))
    for side, runs in results.items():
        for r in runs:
            if r.get("ours_facts"):
                print(f"{side}: " + ", ".join(f"{k} {v}" for k, v in r["ours_facts"].items()))
            check = r.get("flattening_check")
            if check:
                print(
                    f"{side}: flattened vs separate logits max diff {check['max_diff']:.3g} (tolerance "
                    f"{check['tolerance']:.3g}; with an all-ones mask instead: {check['leak_diff']:.3g})"
                )
            falls = loss_falls(r.get("losses", []))[1] if r.get("losses") else ""
            status = "FAILED: " + "; ".join(r.get("problems", []) + ([r["error"]] if "error" in r else []))
            ok = not r.get("problems") and "error" not in r
            print(f"{side}: {'ok' if ok else status}" + (f" ({falls})" if falls and ok else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2", help="CPU job on example assets")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight shape job")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quant", choices=["none", "nf4"], default="none", help="nf4: QLoRA on both sides")
    parser.add_argument("--samples", type=int, default=None, help="examples (default 64; --shape: 128)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="default 256; --shape: 2048 (tiny 256)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32", help="--model jobs only")
    parser.add_argument("--lr", type=float, default=None, help="default 2e-4; --shape: 1e-3 (random weights)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; medians shown")
    parser.add_argument("--json", default=None, help="write every figure here (rewritten after each side)")
    parser.add_argument("--work", default=None, help="--shape: where the base and data are written (kept)")
    parser.add_argument("--assets", default=None, help="tokenizer/ and gsm8k.jsonl instead of the example cache")
    parser.add_argument("--ours-packing", choices=["auto", "true", "false"], default=None)
    parser.add_argument("--ours-group-by-length", choices=["true", "false"], default=None)
    parser.add_argument("--ours-loss", choices=["auto", "chunked", "full"], default=None)
    parser.add_argument("--ours-compile", choices=["true", "false"], default=None)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--write-base", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.started = time.perf_counter()
    args.samples = args.samples or (128 if args.shape else 64)
    # Random weights move slowly at 2e-4: a few dozen steps would not show the loss falling through batch noise.
    args.lr = args.lr or (1e-3 if args.shape else 2e-4)
    args.max_length = args.max_length or (2048 if args.shape and args.shape != "tiny" else 256)
    if args.shape and not args.work:
        args.work = tempfile.mkdtemp(prefix="peftcli-train-bench-")
    if args.device == "cuda" and not args.shape:
        parser.error("--device cuda runs the random-weight shapes: add --shape llama-1b or llama-8b")
    if args.write_base:
        write_base(args)
        return
    if args.child:
        child(args.child, args)
        return

    sides = [s for s in args.sides.split(",") if s]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)}")
    prepare_inputs(args)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("started",)}, "results": results}
    for _ in range(args.rounds):
        for side in sides:
            results[side].append(run_child(args, side))
            report.update(summarize(args, results))
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
    print_table(args, results, report)
    examples = {r.get("examples") for runs in results.values() for r in runs if "examples" in r}
    tokens = {r.get("real_tokens") for runs in results.values() for r in runs if "real_tokens" in r}
    if len(examples) > 1 or len(tokens) > 1:
        print(f"FAILED: the sides saw different data: examples {examples}, real tokens {tokens}")
        sys.exit(1)
    failed = [s for s, runs in results.items() for r in runs if r.get("problems") or "error" in r]
    if failed:
        sys.exit(f"FAILED: {', '.join(sorted(set(failed)))}")


if __name__ == "__main__":
    main()
