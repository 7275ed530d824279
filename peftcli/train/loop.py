"""The training loop: recipe in, run directory out. One loop for every method, on accelerate.

`train` reads top to bottom: `set_up` builds the run (accelerator, data, model and adapter, optimizer and
schedule, the run directory started or resumed), then it evaluates, optimises step by step with checkpoints,
evaluates again and writes the run. Nothing here prints: progress goes to a `Reporter`, which the CLI
implements.
"""

from __future__ import annotations

import math
import os
import platform
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

import peftcli
from peftcli.data.cache import tokenized_data
from peftcli.data.collate import PadCollator, PairCollator, UnpairedCollator
from peftcli.data.packing import PackedDataset, padding_share, shuffled
from peftcli.data.prepare import mix_with_paths
from peftcli.data.progress_lines import ProgressLines
from peftcli.data.sampler import LengthGroupedSampler
from peftcli.errors import ModelError, OutputError, PeftCliError
from peftcli.launch.presets import Engine
from peftcli.models.experts import experts_left_out
from peftcli.models.load import (
    compile_decoder_layers,
    enable_activation_checkpointing,
    load_base_model,
    load_tokenizer,
    planned_attention,
)
from peftcli.models.quantize import describe_quantization
from peftcli.models.quantized_layers import parameter_count
from peftcli.objectives.registry import get_objective, reference_mode
from peftcli.recipe.load import recipe_to_dict, recipe_to_yaml
from peftcli.recipe.schema import Recipe
from peftcli.recipe.start_adapter import start_chain
from peftcli.train.checkpoint import fsdp_adapter_checkpoints, install_adapter_only_hooks
from peftcli.train.curves import write_run_curves
from peftcli.train.evaluate import evaluate_loss, generation_score, majority_class_rate, prompt_ids
from peftcli.train.fast_path import (
    TOLERANCE,
    ProbeResult,
    check_packing,
    packing_wanted,
    probe_examples,
    run_probe,
    use_chunked_loss,
)
from peftcli.train.head_loss import HeadUnsupported, OutputHead
from peftcli.train.objective import Objective, TaskObjective
from peftcli.train.optim import LearningRateSchedule, build_optimizer
from peftcli.train.preemption import RunStopped, StopRequest
from peftcli.train.preference import PreferenceObjective, RewardObjective, StartingPolicy
from peftcli.train.reference_logps import ReferenceTable, compute_table, fingerprint, load_table, save_table
from peftcli.train.resume_rules import check_resume_changes
from peftcli.train.run_dir import (
    CURVES_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    SAMPLES_FILE,
    TRAINER_STATE,
    append_jsonl,
    check_output_dir,
    checkpoint_path,
    clear_run_dir,
    disk_full_error,
    list_checkpoints,
    mark_incomplete,
    prune_checkpoints,
    read_jsonl,
    read_trainer_state,
    remove_partial_outputs,
    run_lock,
    write_jsonl,
    write_summary,
    write_trainer_state,
)
from peftcli.train.safe_write import out_of_space, write_text_atomic
from peftcli.train.trackers import Trackers, check_trackers_installed, open_trackers
from peftcli.train.unpaired import UnpairedObjective
from peftcli.tuners.adapter import AdapterInfo, apply_adapter, continue_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner


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


@dataclass
class Run:
    """Everything `set_up` built for one run; the loop, evaluation and the summary read it."""

    recipe: Recipe
    out_dir: Path
    mode: str  # "new", "overwrite", "resume" or "restart" (see check_output_dir)
    accelerator: Any
    engine: Engine
    tokenizer: Any
    data: Any  # PreparedData
    train_loader: DataLoader
    eval_loader: DataLoader | None
    model: Any  # as accelerate prepared it
    unwrapped: Any  # the model itself, with its adapter
    info: AdapterInfo
    objective: Objective
    optimizer: Any
    schedule: LearningRateSchedule
    total_steps: int
    facts: dict  # what the plan and the summary both report
    notes: list[str] = field(default_factory=list)  # what the plan says besides its numbers
    state: LoopState = field(default_factory=LoopState)
    trackers: Trackers = field(default_factory=Trackers)  # training.report_to, on the main process

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def deepspeed(self) -> bool:
        return self.engine.kind == "deepspeed"

    @property
    def micro_per_epoch(self) -> int:
        return len(self.train_loader)


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> dict:
    """Run a recipe; returns the run summary (also written to summary.json). A stop signal ends it after the
    current step with a checkpoint and `RunStopped` (train/preemption.py)."""
    reporter, stop = reporter or SilentReporter(), StopRequest()
    out_dir = Path(recipe.output.dir)
    # One writer per run directory, held from before anything loads; the first process holds it for all.
    first = os.environ.get("RANK", "0") in ("", "0")
    # Signals are heard from before the lock is taken: a stop during loading ends with a step-0 checkpoint.
    with stop.listening(), run_lock(out_dir) if first else nullcontext() as note:
        if note:
            reporter.message(f"note: {note}")
        try:
            return _train(recipe, resume, overwrite, reporter, stop)
        except Exception as exc:
            if not out_of_space(exc, out_dir):
                raise
            # A full disk: what was half-written goes, the last complete checkpoint stays resumable.
            removed = remove_partial_outputs(out_dir) if first and out_dir.is_dir() else []
            raise disk_full_error(out_dir, removed) from None


def _train(recipe: Recipe, resume: bool, overwrite: bool, reporter: Reporter, stop: StopRequest) -> dict:
    run = set_up(recipe, resume, overwrite, reporter)
    if not (run.main and recipe.training.report_to):
        return _run_steps(run, reporter, stop)
    config, resumed = recipe_to_dict(recipe), run.mode == "resume"
    with open_trackers(recipe, config, run.out_dir, resumed, run.state.step, reporter.message) as trackers:
        run.trackers = trackers  # closed however the run ends: finished, failed or stopped
        return _run_steps(run, reporter, stop)


def _run_steps(run: Run, reporter: Reporter, stop: StopRequest) -> dict:
    """Evaluate, optimise step by step with checkpoints, evaluate again and write the run."""
    training = run.recipe.training
    evaluation = Evaluation(run, reporter)
    reporter.start({**run.facts, "start_step": run.state.step, "notes": run.notes})
    if run.mode != "resume" and training.eval_at_start:
        evaluation.loss(0)
        evaluation.generations(0)

    stream = _micro_batch_stream(run.accelerator, run.train_loader, run.state.micro_batches)
    run.model.train()
    started = time.perf_counter() - run.state.elapsed
    while run.state.step < run.total_steps:
        if _stop_agreed(run, stop):
            raise _stopped_with_checkpoint(run, stop)
        record = optimizer_step(run, stream, started)
        step = run.state.step
        if step % training.log_every == 0 or step == run.total_steps:
            if run.main:
                log_metrics(run, record)
            reporter.step({**record, "total_steps": run.total_steps})
        if training.eval_every and step % training.eval_every == 0 and step < run.total_steps:
            evaluation.loss(step)
        if training.save_every and step % training.save_every == 0 and step < run.total_steps:
            save_checkpoint(run)

    evaluation.loss(run.state.step)
    evaluation.generations(run.state.step)
    return finish(run, reporter)


# --- set-up -------------------------------------------------------------------------------------------------------


def set_up(recipe: Recipe, resume: bool, overwrite: bool, reporter: Reporter) -> Run:
    """Accelerator, data, model and adapter, optimizer, then the run directory started or resumed."""
    from peftcli.train.distributed import unwrap_model

    out_dir = Path(recipe.output.dir)
    mode = check_output_dir(out_dir, resume, overwrite)  # before any work: a refused directory costs nothing
    check_trackers_installed(recipe.training.report_to)
    if mode == "resume":
        check_resume_changes(out_dir / RECIPE_FILE, recipe_to_dict(recipe))
    accelerator, engine, whole_base = _accelerator(recipe)
    pairs = get_objective(recipe.objective.name).capabilities.preference_data
    capable = get_tuner(recipe.method.name).capabilities.packing and not pairs  # an example's rows stay whole
    packing = packing_wanted(recipe, capable, planned_attention(recipe.model))
    reference = _reference_mode(recipe, engine)
    tokenizer, data, train_loader, eval_loader, batching = _data(recipe, accelerator, reporter, packing, reference)
    total_steps = _total_steps(recipe.training, math.ceil(len(train_loader) / accelerator.num_processes))
    model, info = _model_and_adapter(recipe, accelerator, engine, whole_base, tokenizer, data, total_steps, reporter)
    optimizer = build_optimizer(model, recipe.training, info.implementation.optimizer_groups(model, recipe.method))
    packed = train_loader.dataset if packing else None
    loaders = (train_loader, eval_loader) if eval_loader is not None else (train_loader,)
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    install_adapter_only_hooks(accelerator)
    unwrapped = unwrap_model(accelerator, model)
    run = Run(
        recipe=recipe,
        out_dir=out_dir,
        mode=mode,
        accelerator=accelerator,
        engine=engine,
        tokenizer=tokenizer,
        data=data,
        train_loader=loaders[0],
        eval_loader=loaders[1] if eval_loader is not None else None,
        model=model,
        unwrapped=unwrapped,
        info=info,
        objective=build_objective(recipe, unwrapped, reference),
        optimizer=optimizer,
        schedule=LearningRateSchedule(recipe.training, total_steps),
        total_steps=total_steps,
        facts={},
    )
    probe = _check_fast_paths(run, packed, reporter) if recipe.model.task == "causal_lm" else None
    loss = "chunked" if run.objective.head else "full"
    run.facts = {**_facts(run), **batching, "cross_entropy": loss, "probe": probe, "reference": reference}
    run.notes += _notes(run)
    table = _reference_table(run, reporter) if reference == "precomputed" else None  # before a checkpoint loads
    _start_or_resume(run, reporter)
    if table is not None and run.main:
        save_table(run.out_dir, *table)
    return run


def _reference_mode(recipe: Recipe, engine: Engine) -> str | None:
    """live or precomputed reference log-probabilities (None: the objective has no reference)."""
    if not get_objective(recipe.objective.name).capabilities.reference:
        return None
    trains_base = get_tuner(recipe.method.name).capabilities.kind == "trains_base"
    mode = reference_mode(recipe.objective.reference, trains_base, engine.shards_parameters)
    if mode == "live" and engine.shards_parameters:
        raise PeftCliError(
            f"objective.reference: live swaps the starting adapter in, which {engine.describe()} does not allow; "
            "set precomputed (or auto)"
        )
    return mode


def _reference_table(run: Run, reporter: Reporter) -> tuple[torch.Tensor, str]:
    """The starting policy's log-probabilities of every train and validation example (in `row` order), and the
    hash of the data they belong to: read back from a resumed run's directory when computed on the same data,
    else computed now."""
    splits = (run.data.train, run.data.validation)
    rows = sum(len(split) for split in splits if split is not None)
    data_hash = fingerprint(splits)
    table = load_table(run.out_dir, data_hash, rows) if run.mode == "resume" else None
    if table is None:
        reporter.message(f"computing the reference log-probabilities of {rows} examples (once, before the first step)")
        collator = run.train_loader.collate_fn
        parts = [
            compute_table(run.model, split, collator, run.objective.tokens, run.accelerator,
                          run.recipe.training.batch_size, reporter.message)
            for split in splits if split is not None
        ]  # fmt: skip
        table = torch.cat(parts)
    run.objective.reference = ReferenceTable(table)
    return table, data_hash


def _accelerator(recipe: Recipe):
    """The Accelerator for the launcher's engine (a preset, or none), checked and seeded."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from peftcli.train.distributed import (
        check_processes_joined,
        describe_engine,
        engine_options,
        fsdp_between_cpu_processes,
        starts_from_base_weights,
    )

    whole_base = starts_from_base_weights(recipe.method)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(recipe.training.precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **engine_options(recipe.training, whole_base),
    )
    check_processes_joined(accelerator)
    fsdp_between_cpu_processes(accelerator)
    set_seed(recipe.training.seed)
    return accelerator, describe_engine(accelerator), whole_base


def _data(recipe: Recipe, accelerator, reporter: Reporter, packing: bool, reference: str | None = None):
    """The tokenizer, the prepared data, their loaders (tokenized once, by the main process first), and how
    batches are formed: packed rows, length-grouped or random, with the padding share it leaves."""
    reporter.message(f"loading tokenizer and data for {recipe.model.name_or_path}")
    tokenizer = load_tokenizer(recipe.model)
    # The first process of each machine reads the tokenized-data cache or fills it; the others then read it.
    with accelerator.local_main_process_first():
        data, cached = tokenized_data(recipe, tokenizer, ProgressLines(reporter.message))
    if cached.reused:
        reporter.message(f"tokenized data: from cache {cached.path}")
    elif cached.written:
        reporter.message(f"tokenized data: written to cache {cached.path} ({cached.size / 1e6:.1f} MB)")
    if cached.note:
        reporter.message(f"note: {cached.note}")
    if reference == "precomputed":  # each example's place in the reference table: train, then validation
        data.train = data.train.add_column("row", list(range(len(data.train))))
        if data.validation is not None:
            offset = len(data.train)
            data.validation = data.validation.add_column("row", list(range(offset, offset + len(data.validation))))
    batch, seed = recipe.training.batch_size, recipe.training.seed
    lengths = [len(ids) for ids in data.train["input_ids"]]
    collator = PadCollator(tokenizer.pad_token_id)
    if "rejected_input_ids" in data.train.column_names:  # preference pairs: both sides in one batch
        collator = PairCollator(tokenizer.pad_token_id)
        lengths = [max(a, len(b)) for a, b in zip(lengths, data.train["rejected_input_ids"], strict=True)]
    if "mismatched_input_ids" in data.train.column_names:  # unpaired examples: own and mismatched rows together
        collator = UnpairedCollator(tokenizer.pad_token_id)
        lengths = [max(a, len(b)) for a, b in zip(lengths, data.train["mismatched_input_ids"], strict=True)]
    random_padding = padding_share(lengths, batch, shuffled(len(lengths), seed))
    validation = data.validation
    if packing:
        train = PackedDataset(data.train, recipe.data.max_length)
        train_loader = DataLoader(train, batch_size=batch, shuffle=True, collate_fn=collator)
        validation = None if validation is None else PackedDataset(validation, recipe.data.max_length)
        rows = train.lengths()
        how, padding = "packed", padding_share(rows, batch, shuffled(len(rows), seed))
    elif recipe.data.group_by_length:
        # Grouped by the batch of all processes together: accelerate hands its consecutive per-device parts
        # to the processes, so a step sees the same examples whatever the number of processes.
        sampler = LengthGroupedSampler(lengths, batch * accelerator.num_processes, seed)
        train_loader = DataLoader(data.train, batch_size=batch, sampler=sampler, collate_fn=collator)
        how, padding = "length-grouped", padding_share(lengths, batch, list(sampler))
    else:
        train_loader = DataLoader(data.train, batch_size=batch, shuffle=True, collate_fn=collator)
        how, padding = "random", random_padding
    eval_loader = None if validation is None else DataLoader(validation, batch_size=batch, collate_fn=collator)
    batching = {"packing": packing, "batches": how, "padding_share": {"random": random_padding, how: padding}}
    return tokenizer, data, train_loader, eval_loader, batching


def _total_steps(training, micro_per_epoch: int) -> int:
    """Optimizer steps of the run, known before the model is built (AdaLoRA's budget needs it)."""
    if training.max_steps is not None:
        return training.max_steps
    return max(1, math.ceil((training.epochs or 1.0) * micro_per_epoch / training.gradient_accumulation))


def _model_and_adapter(recipe, accelerator, engine, whole_base, tokenizer, data, total_steps, reporter):
    """The base model with the recipe's method applied (built partitioned under ZeRO-3 unless the method
    starts from whole weights), activation checkpointing on if asked."""
    from peftcli.train.distributed import whole_weights

    if engine.kind == "deepspeed" and engine.zero_stage == 3:
        how = "whole in each process (the method starts from its weights)" if whole_base else "partitioned (zero.Init)"
        reporter.message(f"loading the base model {how}")
    else:
        reporter.message("loading the base model")
    label_names = getattr(data, "label_names", None)
    placement = {"device_map": {"": str(accelerator.device)}} if recipe.model.quantization is not None else {}
    with whole_weights(accelerator, engine, whole_base):
        model = load_base_model(recipe.model, **placement, **({"label_names": label_names} if label_names else {}))
        context = AdapterContext(task=recipe.model.task, tokenizer=tokenizer, total_steps=total_steps)
        try:
            info = apply_adapter(model, recipe.method, context)
        except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as a RuntimeError
            if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
                raise
            asked = re.search(r"allocate (\d+) bytes", str(exc))
            size = f": one of its tensors needs {int(asked[1]) / 1e9:,.1f} GB" if asked else ""
            raise ModelError(
                f"method: the {recipe.method.name} adapter does not fit in memory{size}; lower its size (method.r, "
                "or the method's size setting)"
            ) from None
        if recipe.model.adapter is not None:
            continue_adapter(model, recipe.model.adapter)
    if recipe.training.activation_checkpointing:
        enable_activation_checkpointing(model)
    if recipe.training.compile:
        reporter.message(f"compiling {compile_decoder_layers(model)} decoder layers (the first steps take longer)")
    return model, info


def build_objective(recipe: Recipe, model, reference_mode: str | None = "live") -> Objective:
    """The recipe's objective over the prepared model; a live reference snapshots the trainable tensors now,
    before any step or checkpoint load: they are the starting policy (a precomputed one is filled in later)."""
    tokens = TaskObjective(recipe.model.task, model.config)
    spec = get_objective(recipe.objective.name)
    if not spec.capabilities.preference_data:
        return tokens
    live = spec.capabilities.reference and reference_mode == "live"
    reference = StartingPolicy.snapshot(model) if live else None
    if spec.capabilities.data == "unpaired":
        return UnpairedObjective(recipe.objective, tokens, reference)
    return PreferenceObjective(recipe.objective, tokens, reference)


def _facts(run: Run) -> dict:
    """The numbers the plan shows before training and the summary keeps after it."""
    training, data = run.recipe.training, run.data
    return {
        "total_steps": run.total_steps,
        "micro_batches_per_epoch": run.micro_per_epoch,
        "effective_batch_size": training.batch_size * training.gradient_accumulation * run.world,
        "batch_size": training.batch_size,
        "accumulation": training.gradient_accumulation,
        "world_size": run.world,
        "engine": run.engine.describe(run.world),
        "train_examples": len(data.train),
        "validation_examples": 0 if data.validation is None else len(data.validation),
        "trainable_params": run.info.trainable_count(run.unwrapped),
        "total_params": sum(parameter_count(p) for p in run.unwrapped.parameters()),
        "targeted_modules": len(run.info.targeted),
        "targeted_parameters": len(run.info.targeted_parameters),
        "precision": run.accelerator.mixed_precision,
        "quantization": describe_quantization(run.unwrapped),
        "optimizer": training.optimizer,
        "task": run.recipe.model.task,
        "label_names": getattr(data, "label_names", None),
        "device": str(run.accelerator.device),
        "data_stats": {k: vars(v) for k, v in data.stats.items()},
        "data_mix": mix_with_paths(run.recipe, data.stats["train"]),
        # read when the run starts: the adapter directory may be trained again while this run goes on
        "start_chain": start_chain(Path(run.recipe.model.adapter)) if run.recipe.model.adapter else None,
    }


def _notes(run: Run) -> list[str]:
    """What the plan should tell the user besides its numbers."""
    info = run.info
    experts = experts_left_out(run.unwrapped, [*info.param_names, *info.targeted_parameters])
    notes = [experts] if experts else []
    chain = run.facts.get("start_chain")
    if chain:
        start = chain[-1]
        notes.append(f"starts from the {start['method']} adapter in {start['adapter']} (training continues it)")
        if start["base_model"] not in (None, run.recipe.model.name_or_path):
            notes.append(
                f"model.adapter was trained on {start['base_model']}; this run loads {run.recipe.model.name_or_path}"
            )
    return notes


def _check_fast_paths(run: Run, packed: PackedDataset | None, reporter: Reporter) -> dict:
    """Run the probe (train/fast_path.py) on the prepared model: refuse a packing backend that leaks, and take
    the chunked loss unless it disagrees with full logits. Every process runs it: sharded weights need all."""
    recipe = run.recipe
    setting, name = recipe.training.cross_entropy, recipe.model.name_or_path
    head, result = None, ProbeResult()
    if setting != "full":
        try:
            head = OutputHead(run.unwrapped)
        except HeadUnsupported as exc:
            result.chunked_unsupported = str(exc)
    half = run.accelerator.mixed_precision in ("bf16", "fp16") or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in run.unwrapped.parameters() if p.is_floating_point()
    )
    tolerance = TOLERANCE["half" if half else "full"]
    examples, packs = probe_examples(run.data.train, packed)
    if packs or head is not None:
        reporter.message("checking packing and the chunked loss against plain forwards")
        device, config = run.accelerator.device, run.unwrapped.config
        result = run_probe(run.model, head, examples, packs, run.tokenizer.pad_token_id, device, config)
        backend = getattr(config, "_attn_implementation", None) or "default"
        check_packing(result, tolerance, name, backend)
    if setting != "full":
        chunked, note = use_chunked_loss(result, tolerance, setting, name)
        run.objective.head = head if chunked else None
        run.notes += [note] if note else []
    return {"packing_error": result.packing_error, "chunked_error": result.chunked_error}


def _start_or_resume(run: Run, reporter: Reporter) -> None:
    """A new run writes its recipe; a resumed one loads its newest loadable checkpoint and forgets later
    metrics."""
    out_dir, recipe = run.out_dir, run.recipe
    if run.mode == "resume":
        ckpt = _load_newest_checkpoint(run, reporter)
        if run.main:  # what the interrupted run logged after its last checkpoint is redone
            metrics = out_dir / METRICS_FILE
            write_jsonl(metrics, [r for r in read_jsonl(metrics) if r.get("step", 0) <= run.state.step])
        reporter.message(f"resuming from {ckpt} (step {run.state.step} of {run.total_steps})")
        changed = check_resume_changes(out_dir / RECIPE_FILE, recipe_to_dict(recipe))
        if changed:
            reporter.message(f"note: the recipe differs from the run's {RECIPE_FILE} in {', '.join(changed)}")
    elif run.main:
        if run.mode == "restart":
            reporter.message(f"{out_dir} stopped before its first complete checkpoint: starting it again")
        if run.mode in ("overwrite", "restart"):
            clear_run_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / RECIPE_FILE, recipe_to_yaml(recipe))
    run.accelerator.wait_for_everyone()


def _load_newest_checkpoint(run: Run, reporter: Reporter) -> Path:
    """Load the newest checkpoint that reads back whole; a damaged one is skipped with a warning."""
    problems = []
    for _, ckpt in reversed(list_checkpoints(run.out_dir)):
        try:
            state = LoopState(**read_trainer_state(ckpt))
            with fsdp_adapter_checkpoints(run.engine.kind == "fsdp"):
                run.accelerator.load_state(str(ckpt), **({"load_module_strict": False} if run.deepspeed else {}))
        except Exception as exc:  # a torn or truncated file: any reader's error means the same
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            reporter.message(f"warning: checkpoint {ckpt} cannot be read ({problem}); trying the one before it")
            problems.append(f"{ckpt.name} ({problem})")
            continue
        run.state = state
        return ckpt
    raise OutputError(
        f"output.dir: {run.out_dir}: no checkpoint can be read: {'; '.join(problems)}; pass --overwrite to start again"
    )


# --- one optimizer step ---------------------------------------------------------------------------------------


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


def optimizer_step(run: Run, stream, started: float) -> dict:
    """One optimizer step over an accumulation window; returns its metrics record.

    The objective's label losses are summed over the whole window and divided once by the window's label
    count over all processes: every label weighs the same whatever the padding, accumulation or world size.
    """
    training, accelerator, model = run.recipe.training, run.accelerator, run.model
    step_start = time.perf_counter()
    accumulation = training.gradient_accumulation
    window = [next(stream) for _ in range(accumulation)]
    _reseed(training.seed, run.state.step, accelerator.process_index, run.world)
    local = [
        sum(run.objective.label_count(b) for _, b in window),
        sum(int(b["attention_mask"].sum()) for _, b in window),
    ]
    counts = accelerator.reduce(torch.tensor(local, device=accelerator.device, dtype=torch.float64), "sum")
    labels = max(1.0, float(counts[0]))
    rates = run.schedule.apply(run.optimizer, run.state.step)  # before the backward: DeepSpeed steps in the last
    method, params = run.info.implementation, run.info.params
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for index, (_, batch) in enumerate(window):
        if run.deepspeed:  # the engine counts micro-steps itself and divides each loss by their number
            context, engine_scale = accelerator.accumulate(model), accumulation
        else:
            last = index == accumulation - 1
            context, engine_scale = nullcontext() if last else accelerator.no_sync(model), 1
        with context:
            summed = run.objective.loss_sum(model, batch)
            loss = summed * run.world * engine_scale / labels
            penalty = method.extra_loss(run.unwrapped, params)
            if penalty is not None:  # a per-step regulariser (AdaLoRA), spread over the window
                loss = loss + penalty / accumulation
            accelerator.backward(loss)
        loss_sum += summed.detach().double()
    grad_norm = None
    if training.max_grad_norm is not None:  # DeepSpeed: its engine's norm
        norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], training.max_grad_norm)
        grad_norm = None if norm is None else float(norm)
    run.optimizer.step()
    method.after_optimizer_step(run.unwrapped, params, run.state.step)  # reads gradients: before clearing
    run.optimizer.zero_grad(set_to_none=True)

    value = float(accelerator.reduce(loss_sum, "sum")) / labels
    extra = {}
    if isinstance(run.objective, RewardObjective):  # rewards, margin...: means over the window's examples
        sums = accelerator.reduce(run.objective.take_metrics(accelerator.device), "sum")
        extra = run.objective.metric_means(sums)
    state = run.state
    state.step += 1
    state.micro_batches += accumulation
    state.tokens += int(counts[1])
    state.label_tokens += int(counts[0])
    state.elapsed = time.perf_counter() - started
    if not math.isfinite(value):
        raise PeftCliError(
            f"training.learning_rate: the loss became {value} at step {state.step}; lower training.learning_rate "
            "(or method.alpha, or look for extreme values in the data)"
        )
    return {
        "type": "train",
        "step": state.step,
        "epoch": round(state.micro_batches / run.micro_per_epoch, 4),
        "loss": value,
        **extra,
        **rates,
        "grad_norm": grad_norm,
        "tokens_per_s": int(counts[1]) / max(1e-9, time.perf_counter() - step_start),
        "tokens": state.tokens,
        "elapsed_s": round(state.elapsed, 3),
        "epoch_index": window[-1][0],
    }


def log_metrics(run: Run, record: dict) -> None:
    """One record of metrics.jsonl (main process), and the same numbers to every tracker."""
    append_jsonl(run.out_dir / METRICS_FILE, record)
    run.trackers.log(record)


def save_checkpoint(run: Run) -> None:
    """What a resume needs: the adapter, optimizer and data position; older checkpoints pruned."""
    ckpt = checkpoint_path(run.out_dir, run.state.step)
    if run.main:
        mark_incomplete(ckpt)
    run.accelerator.wait_for_everyone()
    # DeepSpeed writes its engine's checkpoint; without the frozen base it is the adapter's size
    with fsdp_adapter_checkpoints(run.engine.kind == "fsdp"):  # FSDP2: the adapter's shards, not the base's
        run.accelerator.save_state(str(ckpt), **({"exclude_frozen_parameters": True} if run.deepspeed else {}))
    if run.main:
        write_trainer_state(ckpt, vars(run.state))
        prune_checkpoints(run.out_dir, run.recipe.training.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _stop_agreed(run: Run, stop: StopRequest) -> bool:
    """Whether any process was asked to stop: all of them must stop at the same step to checkpoint together."""
    asked = stop.signal is not None
    if run.world == 1:
        return asked
    flag = torch.tensor([float(asked)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, "max").item())


def _stopped_with_checkpoint(run: Run, stop: StopRequest) -> RunStopped:
    """Write the checkpoint a stop needs (unless this step has one) and the error that ends the run."""
    ckpt = checkpoint_path(run.out_dir, run.state.step)
    if not (ckpt / TRAINER_STATE).is_file():
        save_checkpoint(run)
    number = stop.signal if stop.signal is not None else signal.SIGTERM  # asked on another process
    return RunStopped(number, run.state.step, run.total_steps, ckpt)


# --- evaluation and the end of the run --------------------------------------------------------------------------


class Evaluation:
    """Validation loss (and accuracy) and sampled generations, logged to the run directory."""

    def __init__(self, run: Run, reporter: Reporter):
        self.run, self.reporter = run, reporter
        self.prompts: list[list[int]] = []
        gen, validation = run.recipe.training.eval_generation, run.data.validation
        if gen is not None and validation is not None:
            shown = range(min(gen.prompts, len(validation)))
            if run.recipe.model.task == "seq2seq":  # the whole encoder input is the prompt
                self.prompts = [list(validation[i]["input_ids"]) for i in shown]
            else:
                self.prompts = [prompt_ids(validation[i]) for i in shown]
            if not all(self.prompts):  # labels from the first token (format text, or mask_prompt off)
                reporter.message(
                    "note: no generation score (training.eval_generation): the validation examples have no prompt "
                    "before their labels"
                )
                self.prompts = []

    def loss(self, step: int) -> None:
        run = self.run
        if run.eval_loader is None:
            return
        result = evaluate_loss(run.model, run.eval_loader, run.accelerator, run.objective)
        result["step"] = step
        if run.main:
            log_metrics(run, {"type": "eval", **result})
        self.reporter.evaluation(result)

    def generations(self, step: int) -> None:
        run, gen = self.run, self.run.recipe.training.eval_generation
        if not self.prompts:
            return
        if run.main or run.engine.shards_parameters:  # sharded weights: every process takes part in each forward
            started = time.monotonic()

            def scored(done: int, total: int) -> None:
                if run.main and done < total:  # the last batch is reported with the score itself
                    self.reporter.message(
                        f"generation @ step {step}: {done}/{total} prompts answered ({time.monotonic() - started:.0f}s)"
                    )

            with run.accelerator.autocast():
                result, answers = generation_score(
                    run.unwrapped, run.tokenizer, self.prompts, gen.max_new_tokens, gen.pattern, on_batch=scored
                )
        if run.main:
            result["step"] = step
            log_metrics(run, {"type": "generation", **result})
            for prompt, answer in zip(self.prompts, answers, strict=True):
                record = {"step": step, "prompt": run.tokenizer.decode(prompt), "answer": answer}
                append_jsonl(run.out_dir / SAMPLES_FILE, record)
            self.reporter.evaluation(result)
        run.accelerator.wait_for_everyone()


def finish(run: Run, reporter: Reporter) -> dict:
    """Save the adapter, tokenizer and summary (main process), and end the run on every process."""
    from peftcli.train.distributed import full_state_dict, gathered

    summary = None
    state_dict = full_state_dict(run.accelerator, run.model, run.engine)  # FSDP2: gathered on the main process
    with gathered(run.unwrapped, run.engine):  # ZeRO-3: every process takes part in gathering the adapter
        if run.main:
            save_adapter(run.unwrapped, run.out_dir, run.recipe.model.name_or_path, state_dict=state_dict)
    if run.main:
        run.tokenizer.save_pretrained(run.out_dir)
        summary = _summary(run)
        write_summary(run.out_dir, summary)
        _draw_curves(run, reporter)
        run.trackers.summary(summary)
        reporter.finish(summary)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return summary or {}


def _draw_curves(run: Run, reporter: Reporter) -> None:
    """curves.png beside the summary. Only at the end: a stop must end quickly (`peft runs plot` draws any run)."""
    try:
        write_run_curves(run.out_dir)
    except Exception as exc:  # a picture is not worth a finished run: one warning line instead
        reporter.message(f"warning: {CURVES_FILE} not drawn ({type(exc).__name__}: {exc})")


def _peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: the accelerator's allocations (CUDA), and resident host memory."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return {
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_host_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
    }


def _summary(run: Run) -> dict:
    records = read_jsonl(run.out_dir / METRICS_FILE)
    evals = [r for r in records if r["type"] == "eval"]
    gens = [r for r in records if r["type"] == "generation"]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    tail, state, facts = losses[-10:], run.state, run.facts
    kept = ("total_steps", "effective_batch_size", "engine", "quantization", "optimizer", "task", "label_names")
    kept += ("packing", "batches", "padding_share", "cross_entropy", "reference")
    return {
        "method": run.recipe.method.name,
        "objective": run.recipe.objective.name,
        "base_model": run.recipe.model.name_or_path,
        "steps": state.step,
        "epochs": round(state.micro_batches / run.micro_per_epoch, 4),
        "train_tokens": state.tokens,
        "train_label_tokens": state.label_tokens,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "eval_before": evals[0] if evals and evals[0]["step"] == 0 else None,
        "eval_after": evals[-1] if evals else None,
        "generation_before": gens[0] if gens and gens[0]["step"] == 0 else None,
        "generation_after": gens[-1] if gens else None,
        "trainable_params": facts["trainable_params"],
        "total_params": facts["total_params"],
        "trainable_share": facts["trainable_params"] / max(1, facts["total_params"]),
        "time_s": round(state.elapsed, 2),
        "tokens_per_s": round(state.tokens / max(1e-9, state.elapsed), 1),
        "world_size": run.world,
        **_peak_memory(run.accelerator.device),
        **{key: facts[key] for key in kept},
        "majority_class_rate": majority_class_rate(run.data.validation, run.recipe.model.task),
        "data": {"mix": facts["data_mix"]},  # per source: examples and tokens of one epoch
        "output_dir": str(run.out_dir),
        **({"start_chain": facts["start_chain"]} if facts.get("start_chain") else {}),
        "versions": {
            "peftcli": peftcli.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
