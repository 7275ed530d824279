"""The training loop: recipe in, adapter directory out. One loop for every method, on accelerate.

Read top to bottom: check the output directory, build the accelerator, tokenizer, data, model and
adapter, evaluate, then optimise step by step with checkpoints, evaluate again and write the run.
Nothing here prints: progress goes to a `Reporter`, which the CLI implements.
"""

from __future__ import annotations

import json
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from torch.utils.data import DataLoader

import peftcli
from peftcli.data.collate import PadCollator
from peftcli.data.prepare import prepare_data
from peftcli.errors import PeftCliError
from peftcli.models.experts import experts_left_out
from peftcli.models.load import enable_activation_checkpointing, load_base_model, load_tokenizer
from peftcli.models.quantize import describe_quantization
from peftcli.models.quantized_layers import parameter_count
from peftcli.recipe.load import recipe_to_dict, recipe_to_yaml
from peftcli.recipe.schema import Recipe
from peftcli.train.checkpoint import (
    fsdp_adapter_checkpoints,
    install_adapter_only_hooks,
    read_trainer_state,
    write_trainer_state,
)
from peftcli.train.evaluate import evaluate_loss, generation_score, majority_class_rate, prompt_ids
from peftcli.train.losses import batch_loss_sums, forward_logits, label_count
from peftcli.train.optim import build_optimizer, lr_factor, warmup_steps
from peftcli.train.output_dir import (
    RECIPE_FILE,
    check_output_dir,
    checkpoint_path,
    clear_run_dir,
    list_checkpoints,
    prune_checkpoints,
)
from peftcli.tuners.adapter import apply_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import load_implementation

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"


class Reporter(Protocol):
    """Receives progress; the CLI shows it, tests ignore it."""

    def start(self, plan: dict) -> None: ...
    def step(self, metrics: dict) -> None: ...
    def evaluation(self, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: dict) -> None: ...


class SilentReporter:
    """A reporter that shows nothing."""

    def start(self, plan: dict) -> None: ...
    def step(self, metrics: dict) -> None: ...
    def evaluation(self, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: dict) -> None: ...


def resolve_precision(name: str) -> str:
    """The accelerate mixed-precision mode for a recipe's training.precision."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if name == "fp32":
        return "no"
    if name == "fp16" and not cuda:
        raise PeftCliError("training.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return name


@dataclass
class LoopState:
    """Counters that a checkpoint restores."""

    step: int = 0
    micro_batches: int = 0  # consumed per process, across epochs
    tokens: int = 0  # non-padding tokens seen, all processes
    label_tokens: int = 0
    elapsed: float = 0.0


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _changed_keys(saved_recipe: Path, recipe: Recipe) -> list[str]:
    """Dotted keys whose value differs between a run's saved recipe and the one resuming it."""
    if not saved_recipe.is_file():
        return []
    old = _flatten(yaml.safe_load(saved_recipe.read_text(encoding="utf-8")))
    new = _flatten(recipe_to_dict(recipe))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _micro_batch_stream(accelerator, dataloader, start: int):
    """Micro-batches forever, epoch after epoch, starting after the first `start` of them (resume)."""
    per_epoch = len(dataloader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in batches:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def _reseed(seed: int, step: int, rank: int, world: int) -> None:
    # Dropout randomness depends only on (seed, step, rank): a resumed run draws what an unbroken one would.
    torch.manual_seed((seed * 1_000_003 + step * world + rank) % (2**63))


def _notes(model, info) -> list[str]:
    """What the plan should tell the user besides its numbers."""
    experts = experts_left_out(model, [*info.param_names, *info.targeted_parameters])
    return [experts] if experts else []


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> dict:
    """Run a recipe; returns the run summary (also written to summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from peftcli.train.distributed import (
        check_processes_joined,
        describe_engine,
        engine_options,
        fsdp_between_cpu_processes,
        full_state_dict,
        gathered,
        starts_from_base_weights,
        unwrap_model,
        whole_weights,
    )

    reporter = reporter or SilentReporter()
    training = recipe.training
    out_dir = Path(recipe.output.dir)
    mode = check_output_dir(out_dir, resume, overwrite)

    whole_base = starts_from_base_weights(recipe.method)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(training.precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **engine_options(training, whole_base),
    )
    check_processes_joined(accelerator)
    fsdp_between_cpu_processes(accelerator)
    engine = describe_engine(accelerator)
    deepspeed = engine.kind == "deepspeed"
    main = accelerator.is_main_process
    set_seed(training.seed)

    reporter.message(f"loading tokenizer and data for {recipe.model.name_or_path}")
    tokenizer = load_tokenizer(recipe.model)
    with accelerator.main_process_first():  # tokenize once; the other processes read the datasets cache
        data = prepare_data(recipe, tokenizer)

    task = recipe.model.task
    world = accelerator.num_processes
    accumulation = training.gradient_accumulation
    collator = PadCollator(tokenizer.pad_token_id)
    train_loader = DataLoader(data.train, batch_size=training.batch_size, shuffle=True, collate_fn=collator)
    eval_loader = None
    if data.validation is not None:
        eval_loader = DataLoader(data.validation, batch_size=training.batch_size, collate_fn=collator)
    # Known before the model is built, for methods with schedules (AdaLoRA's rank budget). Each process
    # sees its share of the batches.
    micro_per_epoch = math.ceil(len(train_loader) / world)
    if training.max_steps is not None:
        total_steps = training.max_steps
    else:
        total_steps = max(1, math.ceil((training.epochs or 1.0) * micro_per_epoch / accumulation))
    warm = warmup_steps(training, total_steps)

    if engine.kind == "deepspeed" and engine.zero_stage == 3:
        how = "whole in each process (the method starts from its weights)" if whole_base else "partitioned (zero.Init)"
        reporter.message(f"loading the base model {how}")
    else:
        reporter.message("loading the base model")
    label_names = getattr(data, "label_names", None)
    placement = {"device_map": {"": str(accelerator.device)}} if recipe.model.quantization is not None else {}
    with whole_weights(accelerator, engine, whole_base):
        model = load_base_model(recipe.model, **placement, **({"label_names": label_names} if label_names else {}))
        context = AdapterContext(task=task, tokenizer=tokenizer, total_steps=total_steps)
        info = apply_adapter(model, recipe.method, context)
    method = load_implementation(recipe.method.name)
    if training.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = info.trainable_count(model)
    total_params = sum(parameter_count(p) for p in model.parameters())

    method_groups = method.optimizer_groups(model, recipe.method) if hasattr(method, "optimizer_groups") else None
    optimizer = build_optimizer(model, training, method_groups)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    if eval_loader is not None:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    install_adapter_only_hooks(accelerator)
    unwrapped = unwrap_model(accelerator, model)
    micro_per_epoch = len(train_loader)
    extra_loss = getattr(method, "extra_loss", None)
    after_optimizer_step = getattr(method, "after_optimizer_step", None)

    state = LoopState()
    metrics_path = out_dir / METRICS_FILE
    if mode == "resume":
        _, ckpt = list_checkpoints(out_dir)[-1]
        with fsdp_adapter_checkpoints(engine.kind == "fsdp"):
            accelerator.load_state(str(ckpt), **({"load_module_strict": False} if deepspeed else {}))
        state = LoopState(**read_trainer_state(ckpt))
        if main:  # forget what the interrupted run logged after its last checkpoint
            kept = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= state.step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        reporter.message(f"resuming from {ckpt} (step {state.step} of {total_steps})")
        changed = _changed_keys(out_dir / RECIPE_FILE, recipe)
        if changed:
            reporter.message(f"note: the recipe differs from the run's {RECIPE_FILE} in {', '.join(changed)}")
    elif main:
        if mode == "overwrite":
            clear_run_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RECIPE_FILE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
    accelerator.wait_for_everyone()

    prompts: list[list[int]] = []
    gen = training.eval_generation
    if gen is not None and data.validation is not None:
        shown = range(min(gen.prompts, len(data.validation)))
        if task == "seq2seq":  # the whole encoder input is the prompt
            prompts = [list(data.validation[i]["input_ids"]) for i in shown]
        else:
            prompts = [prompt_ids(data.validation[i]) for i in shown]

    def run_generation(step: int) -> dict | None:
        if not prompts:
            return None
        result = None
        if main or engine.shards_parameters:  # sharded weights: every process takes part in each forward
            with accelerator.autocast():
                result, answers = generation_score(unwrapped, tokenizer, prompts, gen.max_new_tokens, gen.pattern)
        if main:
            result["step"] = step
            _append_jsonl(metrics_path, {"type": "generation", **result})
            for prompt, answer in zip(prompts, answers, strict=True):
                _append_jsonl(
                    out_dir / SAMPLES_FILE,
                    {"step": step, "prompt": tokenizer.decode(prompt), "answer": answer},
                )
            reporter.evaluation(result)
        accelerator.wait_for_everyone()
        return result

    def run_eval(step: int) -> dict | None:
        if eval_loader is None:
            return None
        result = evaluate_loss(model, eval_loader, accelerator, task, unwrapped.config)
        result["step"] = step
        if main:
            _append_jsonl(metrics_path, {"type": "eval", **result})
        reporter.evaluation(result)
        return result

    effective_batch = training.batch_size * accumulation * world
    reporter.start(
        {
            "total_steps": total_steps,
            "start_step": state.step,
            "micro_batches_per_epoch": micro_per_epoch,
            "effective_batch_size": effective_batch,
            "batch_size": training.batch_size,
            "accumulation": accumulation,
            "world_size": world,
            "engine": engine.describe(),
            "train_examples": len(data.train),
            "validation_examples": 0 if data.validation is None else len(data.validation),
            "trainable_params": trainable,
            "total_params": total_params,
            "targeted_modules": len(info.targeted),
            "targeted_parameters": len(info.targeted_parameters),
            "precision": accelerator.mixed_precision,
            "quantization": describe_quantization(unwrapped),
            "optimizer": training.optimizer,
            "task": task,
            "label_names": label_names,
            "device": str(accelerator.device),
            "data_stats": {k: vars(v) for k, v in data.stats.items()},
            "notes": _notes(unwrapped, info),
        }
    )

    if mode != "resume" and training.eval_at_start:
        run_eval(0)
        run_generation(0)

    params = [p for p in model.parameters() if p.requires_grad]
    stream = _micro_batch_stream(accelerator, train_loader, state.micro_batches)
    model.train()
    started = time.perf_counter() - state.elapsed
    while state.step < total_steps:
        step_start = time.perf_counter()
        window = [next(stream) for _ in range(accumulation)]
        epoch = window[-1][0]
        _reseed(training.seed, state.step, accelerator.process_index, world)
        local_labels = sum(label_count(b, task) for _, b in window)
        local_tokens = sum(int(b["attention_mask"].sum()) for _, b in window)
        counts = accelerator.reduce(
            torch.tensor([local_labels, local_tokens], device=accelerator.device, dtype=torch.float64), "sum"
        )
        global_labels = max(1.0, float(counts[0]))
        loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        factor = lr_factor(state.step, total_steps, warm, training.schedule)
        for group in optimizer.param_groups:  # before the backward passes: DeepSpeed steps inside the last one
            group["lr"] = group["peak_lr"] * factor
        for index, (_, batch) in enumerate(window):
            # Sum the token losses of the whole window, divide once by its global token count: every token
            # weighs the same whatever the padding, accumulation or number of processes.
            sync = index == accumulation - 1
            if deepspeed:  # the engine counts micro-steps itself and divides each loss by their number
                context, engine_scale = accelerator.accumulate(model), accumulation
            else:
                context, engine_scale = nullcontext() if sync else accelerator.no_sync(model), 1
            with context:
                logits = forward_logits(model, batch, task, unwrapped.config)
                sums, _ = batch_loss_sums(logits, batch, task)
                objective = sums.sum() * world * engine_scale / global_labels
                penalty = extra_loss(unwrapped) if extra_loss is not None else None
                if penalty is not None:  # a per-step regulariser (AdaLoRA), spread over the window
                    objective = objective + penalty / accumulation
                accelerator.backward(objective)
            loss_sum += sums.sum().detach().double()
        grad_norm = None
        if training.max_grad_norm is not None:
            norm = accelerator.clip_grad_norm_(params, training.max_grad_norm)  # DeepSpeed: its engine's norm
            grad_norm = None if norm is None else float(norm)
        optimizer.step()
        if after_optimizer_step is not None:  # reads the gradients, so before they are cleared
            after_optimizer_step(unwrapped, state.step)
        optimizer.zero_grad(set_to_none=True)

        loss = float(accelerator.reduce(loss_sum, "sum")) / global_labels
        state.step += 1
        state.micro_batches += accumulation
        state.tokens += int(counts[1])
        state.label_tokens += int(counts[0])
        state.elapsed = time.perf_counter() - started
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {state.step}; lower training.learning_rate")
        if state.step % training.log_every == 0 or state.step == total_steps:
            record = {
                "type": "train",
                "step": state.step,
                "epoch": round(state.micro_batches / micro_per_epoch, 4),
                "loss": loss,
                "lr": training.learning_rate * factor,
                "grad_norm": grad_norm,
                "tokens_per_s": int(counts[1]) / max(1e-9, time.perf_counter() - step_start),
                "tokens": state.tokens,
                "elapsed_s": round(state.elapsed, 3),
                "epoch_index": epoch,
            }
            if main:
                _append_jsonl(metrics_path, record)
            reporter.step({**record, "total_steps": total_steps})
        if training.eval_every and state.step % training.eval_every == 0 and state.step < total_steps:
            run_eval(state.step)
        if training.save_every and state.step % training.save_every == 0 and state.step < total_steps:
            ckpt = checkpoint_path(out_dir, state.step)
            # DeepSpeed writes its engine's checkpoint; without the frozen base it is the adapter's size
            with fsdp_adapter_checkpoints(engine.kind == "fsdp"):  # FSDP2: the adapter's shards, not the base's
                accelerator.save_state(str(ckpt), **({"exclude_frozen_parameters": True} if deepspeed else {}))
            if main:
                write_trainer_state(ckpt, vars(state))
                prune_checkpoints(out_dir, training.keep_checkpoints)
            accelerator.wait_for_everyone()

    run_eval(state.step)
    run_generation(state.step)
    summary = None
    state_dict = full_state_dict(accelerator, model, engine)  # FSDP2: gathered on the main process
    with gathered(unwrapped, engine):  # ZeRO-3: every process takes part in gathering the adapter
        if main:
            save_adapter(unwrapped, out_dir, recipe.model.name_or_path, state_dict=state_dict)
    if main:
        tokenizer.save_pretrained(out_dir)
        summary = _summary(recipe, out_dir, state, total_steps, micro_per_epoch, trainable, total_params, world)
        summary["effective_batch_size"] = effective_batch
        summary["engine"] = engine.describe()
        summary["quantization"] = describe_quantization(unwrapped)
        summary["optimizer"] = training.optimizer
        summary["task"] = task
        summary["label_names"] = label_names
        summary["majority_class_rate"] = majority_class_rate(data.validation, task)
        summary["output_dir"] = str(out_dir)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        reporter.finish(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary or {}


def _summary(recipe, out_dir, state, total_steps, micro_per_epoch, trainable, total_params, world) -> dict:
    records = _read_jsonl(out_dir / METRICS_FILE)
    evals = [r for r in records if r["type"] == "eval"]
    gens = [r for r in records if r["type"] == "generation"]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    tail = losses[-10:]
    return {
        "method": recipe.method.name,
        "base_model": recipe.model.name_or_path,
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": round(state.micro_batches / micro_per_epoch, 4),
        "train_tokens": state.tokens,
        "train_label_tokens": state.label_tokens,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "eval_before": evals[0] if evals and evals[0]["step"] == 0 else None,
        "eval_after": evals[-1] if evals else None,
        "generation_before": gens[0] if gens and gens[0]["step"] == 0 else None,
        "generation_after": gens[-1] if gens else None,
        "trainable_params": trainable,
        "total_params": total_params,
        "trainable_share": trainable / max(1, total_params),
        "time_s": round(state.elapsed, 2),
        "tokens_per_s": round(state.tokens / max(1e-9, state.elapsed), 1),
        "world_size": world,
        "versions": {
            "peftcli": peftcli.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
