"""What `peft train` shows: the plan, a progress bar (or plain lines when not on a terminal), the result."""

from __future__ import annotations

import os
import time

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from peftcli.cli.console import make_console
from peftcli.recipe.schema import DataSource, Recipe, SplitValidation


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def print_plan(recipe: Recipe, mode: str, adapted: str | None = None) -> None:
    """The dry-run plan: what would be loaded, trained and written (`adapted`: what the method matched)."""
    console = make_console()
    t = recipe.training
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row(
        "model", f"{recipe.model.name_or_path} (dtype {recipe.model.dtype}, {recipe.model.attn_implementation})"
    )
    params = recipe.method.model_dump(exclude={"name"})
    table.add_row("method", f"{recipe.method.name} " + ", ".join(f"{k}={v}" for k, v in params.items()))
    if adapted:
        table.add_row("adapts", adapted)
    if recipe.model.adapter:
        table.add_row("starts from", f"the adapter in {recipe.model.adapter} (training continues it)")
    objective = recipe.objective.model_dump(exclude={"name"})
    table.add_row("objective", f"{recipe.objective.name} " + ", ".join(f"{k}={v}" for k, v in objective.items()))
    for label, text in _train_rows(recipe):
        table.add_row(label, text)
    val = recipe.data.validation
    if isinstance(val, SplitValidation):
        of = "each training source (before mixing)" if recipe.data.mixed else "the training data"
        table.add_row("validation", f"{val.fraction:.1%} held out of {of}")
    elif isinstance(val, DataSource):
        table.add_row("validation", f"{val.path} [{val.format}]")
    else:
        table.add_row("validation", "none")
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs or 1} epoch(s)"
    table.add_row("length", length)
    packing = {"auto": "auto (on for causal_lm when the method can)", True: "on", False: "off"}[recipe.data.packing]
    grouping = "; unpacked batches grouped by length" if recipe.data.group_by_length else ""
    table.add_row("batching", f"packing {packing}{grouping}; cross-entropy {t.cross_entropy}")
    launch = recipe.launch
    if launch is None:
        table.add_row("processes", "1, or as an outside launcher (accelerate launch, torchrun, srun) starts them")
        world = "world size"
    else:
        from peftcli.launch.presets import read_engine

        per_node = launch.nproc or "one per GPU"
        nodes = f" x {launch.nnodes} machines (this is {launch.node_rank})" if launch.nnodes > 1 else ""
        table.add_row("processes", f"{per_node} per machine{nodes}, {read_engine(launch.preset).describe()}")
        world = str(launch.nproc * launch.nnodes) if launch.nproc else "world size"
    effective = t.batch_size * t.gradient_accumulation
    table.add_row(
        "batch",
        f"{t.batch_size} per device x {t.gradient_accumulation} accumulation x {world} "
        + (f"= {effective * int(world)} effective" if world.isdigit() else f"(effective {effective} per process)"),
    )
    table.add_row(
        "optimizer", f"{t.optimizer} lr {t.learning_rate:g}, {t.schedule} schedule, weight decay {t.weight_decay:g}"
    )
    table.add_row(
        "precision", f"{t.precision}; activation checkpointing {'on' if t.activation_checkpointing else 'off'}"
    )
    table.add_row(
        "evaluation", f"every {t.eval_every} steps" if t.eval_every else "at start and end" if val else "none"
    )
    table.add_row("checkpoints", f"every {t.save_every} steps, keep {t.keep_checkpoints}" if t.save_every else "none")
    verb = {
        "new": "write",
        "resume": "resume in",
        "overwrite": "replace the run in",
        "restart": "start again (no complete checkpoint yet) in",
    }[mode]
    table.add_row("output", f"{verb} {recipe.output.dir}")
    console.print("[bold]plan[/bold] (dry run: nothing loaded, nothing written)")
    console.print(table)


class StepClock:
    """Elapsed time and ETA for plain progress lines (CI logs): the rate counts from the first step this process
    logged, so loading, the first evaluation and a resume's skipped steps do not distort it."""

    def __init__(self, now=time.monotonic) -> None:
        self.now = now
        self.first: tuple[int, float] | None = None

    def tick(self, step: int, total: int) -> str:
        now = self.now()
        if self.first is None:
            self.first = (step, now)
            return ""
        first_step, first_time = self.first
        elapsed = now - first_time
        if step <= first_step:
            return ""
        remaining = elapsed / (step - first_step) * (total - step)
        return f"  elapsed {_clock(elapsed)}  eta {_clock(remaining)}"


def _clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RichReporter:
    """Progress for people (a live bar on a terminal) and for CI logs (one line per logged step)."""

    def __init__(self) -> None:
        self.console = make_console(stderr=True)
        self.enabled = _is_main_process()
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.clock = StepClock()

    def start(self, plan: dict) -> None:
        if not self.enabled:
            return
        c = self.console
        stats = plan["data_stats"]["train"]
        parameters = plan.get("targeted_parameters") or 0
        where = f"{plan['targeted_modules']} modules" + (f" and {parameters} expert parameters" if parameters else "")
        c.print(
            f"[bold]training[/bold] {plan['trainable_params']:,} of {plan['total_params']:,} parameters "
            f"({plan['trainable_params'] / max(1, plan['total_params']):.3%}) in {where}; "
            f"{plan['train_examples']} train / {plan['validation_examples']} validation examples; "
            f"effective batch {plan['effective_batch_size']} = {plan['batch_size']} per device x "
            f"{plan['accumulation']} accumulation x {_processes(plan)}; "
            f"{plan['total_steps']} steps on {plan['device']}, mixed precision {plan['precision']}"
        )
        shares = plan.get("padding_share")
        if shares:
            how = {"packed": "packed rows", "length-grouped": "length-grouped batches", "random": "random batches"}
            kind = plan["batches"]
            compared = "" if kind == "random" else f" ({shares['random']:.1%} in random batches)"
            loss = "chunks of the hidden state" if plan["cross_entropy"] == "chunked" else "full logits"
            c.print(
                f"batches: {how[kind]}, {plan['micro_batches_per_epoch']} per epoch, {shares[kind]:.1%} padding"
                f"{compared}; loss from {loss}",
                highlight=False,
            )
        if plan.get("quantization"):
            c.print(f"base quantized: {plan['quantization']}; optimizer {plan['optimizer']}", highlight=False)
        for note in plan.get("notes", ()):
            c.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False)
        for line in _mix_lines(plan.get("data_mix") or []):
            c.print(escape(line), highlight=False)
        if stats["truncated"] or stats["dropped_no_labels"]:
            c.print(
                f"[yellow]note[/yellow]: {stats['truncated']} training examples truncated to data.max_length, "
                f"{stats['dropped_no_labels']} dropped for having no label tokens"
            )
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=c,
            )
            self.task = self.progress.add_task(
                "train", total=plan["total_steps"], completed=plan["start_step"], info=""
            )
            self.progress.start()

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s"
        if "rewards/accuracy" in metrics:
            info += f"  reward accuracy {metrics['rewards/accuracy']:.0%}  margin {metrics['rewards/margin']:.3f}"
        elif "kl" in metrics:  # kto: a step with examples of one label only has no margin
            margin = metrics["rewards/margin"]
            info += f"  margin {'-' if margin is None else f'{margin:.3f}'}  kl {metrics['kl']:.3f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=metrics["step"], info=info)
        else:
            timing = self.clock.tick(metrics["step"], metrics["total_steps"])
            self.console.print(f"step {metrics['step']}/{metrics['total_steps']}  {info}{timing}", highlight=False)

    def evaluation(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if "eval_rewards/accuracy" in metrics:
            text = (
                f"eval @ step {metrics['step']}: loss {metrics['eval_loss']:.4f}  reward accuracy "
                f"{metrics['eval_rewards/accuracy']:.1%} of {metrics['eval_pairs']} pairs  margin "
                f"{metrics['eval_rewards/margin']:.3f}"
            )
        elif "eval_kl" in metrics:
            text = (
                f"eval @ step {metrics['step']}: loss {metrics['eval_loss']:.4f}  reward margin "
                f"{_maybe(metrics['eval_rewards/margin'])} over {metrics['eval_examples']} examples  kl "
                f"{metrics['eval_kl']:.3f}"
            )
        elif "eval_accuracy" in metrics:
            text = (
                f"eval @ step {metrics['step']}: loss {metrics['eval_loss']:.4f}  "
                f"accuracy {metrics['eval_accuracy']:.2%}"
            )
        elif "eval_loss" in metrics:
            text = f"eval @ step {metrics['step']}: loss {metrics['eval_loss']:.4f}  ppl {metrics['eval_ppl']:.2f}"
        else:
            text = (
                f"generation @ step {metrics['step']}: {metrics['gen_matches']}/{metrics['gen_prompts']} "
                f"answers match ({metrics['gen_score']:.0%})"
            )
        (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        c = self.console
        before, after = summary.get("eval_before"), summary.get("eval_after")
        if before and after and "eval_rewards/accuracy" in after:
            c.print(
                f"[bold]reward accuracy[/bold] {before['eval_rewards/accuracy']:.1%} -> "
                f"{after['eval_rewards/accuracy']:.1%} of {after['eval_pairs']} validation pairs ranked right; margin "
                f"{before['eval_rewards/margin']:.3f} -> {after['eval_rewards/margin']:.3f}; loss "
                f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
            )
        elif before and after and "eval_kl" in after:  # kto: unpaired examples rank nothing; the margin moves
            c.print(
                f"[bold]reward margin[/bold] {_maybe(before['eval_rewards/margin'])} -> "
                f"{_maybe(after['eval_rewards/margin'])} (desirable minus undesirable, over {after['eval_examples']} "
                f"validation examples); kl {before['eval_kl']:.3f} -> {after['eval_kl']:.3f}; loss "
                f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
            )
        elif before and after and "eval_accuracy" in after:
            majority = summary.get("majority_class_rate")
            baseline = f" (majority class: {majority:.2%})" if majority is not None else ""
            c.print(
                f"[bold]validation accuracy[/bold] {before['eval_accuracy']:.2%} -> {after['eval_accuracy']:.2%}"
                f"{baseline}; loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
            )
        elif before and after:
            c.print(
                f"[bold]validation loss[/bold] {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
                f"(perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f})"
            )
        gb, ga = summary.get("generation_before"), summary.get("generation_after")
        if gb and ga:
            c.print(
                f"[bold]generation score[/bold] {gb['gen_matches']}/{gb['gen_prompts']} -> "
                f"{ga['gen_matches']}/{ga['gen_prompts']} answers match the pattern"
            )
        if self.live:  # people see the loss at a glance; pipes and CI logs keep their plain lines
            line = _loss_line(summary)
            if line:
                c.print(line, highlight=False)
        c.print(
            f"done: {summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['time_s']:.1f}s "
            f"({summary['tokens_per_s']:.0f} tok/s); adapter written to {summary.get('output_dir', '')}",
            highlight=False,
        )


def _loss_line(summary: dict) -> str:
    """`train loss ▇▆▄▃▂▁ 7.18 -> 3.72` over the whole run (a resumed one too: it reads metrics.jsonl)."""
    from pathlib import Path

    from peftcli.cli.sparkline import sparkline
    from peftcli.train.run_dir import METRICS_FILE, read_jsonl

    records = read_jsonl(Path(summary.get("output_dir", "")) / METRICS_FILE) if summary.get("output_dir") else []
    losses = [float(r["loss"]) for r in records if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    if len(losses) < 2:
        return ""
    return f"train loss {sparkline(losses)} {losses[0]:.4f} -> {losses[-1]:.4f}"


def _maybe(value: float | None) -> str:
    """A metric that may be missing (a mean over no example), to three decimals."""
    return "-" if value is None else f"{value:.3f}"


def _processes(plan: dict) -> str:
    """`1 process` alone; several with the engine that joins them (DDP, DeepSpeed ZeRO-n, FSDP2)."""
    world, engine = plan["world_size"], plan["engine"]
    if world == 1:
        return "1 process" + ("" if engine == "single process" else f" ({engine})")
    return f"{world} processes ({engine})"


def _train_rows(recipe: Recipe) -> list[tuple[str, str]]:
    """The plan's rows for data.train: its source, or one row per source of a mix with what it asks for."""
    data = recipe.data
    rows = []
    weights = [s.weight for _, s in data.train_sources() if getattr(s, "weight", None) is not None]
    for key, source in data.train_sources():
        text = f"{source.path} [{source.format}]" + (f", first {source.max_samples}" if source.max_samples else "")
        if data.mixed:
            weight, samples = source.weight, source.samples
            if weight is not None:
                text += f"; weight {weight:g} ({weight / sum(weights):.1%} of the examples)"
            else:
                text += f"; {samples} examples (repeated where it has fewer rows)" if samples else "; all its rows"
        rows.append(("train data" if not data.mixed else key, escape(text)))  # escaped: [format] is not markup
    if data.mixed:
        seed = data.shuffle_seed if data.shuffle_seed is not None else recipe.training.seed
        size = "the largest mix with these shares that repeats no row" if weights else "the counts above"
        rows.append(("mix", f"{size}, drawn and interleaved with seed {seed}"))
    return rows


def _mix_lines(mix: list[dict]) -> list[str]:
    """What each source of a mix gave the training set (one epoch, after truncation and dropping)."""
    if len(mix) < 2:
        return []
    lines = ["data mix (one epoch, after truncation and dropping):"]
    for row in mix:
        repeated = f", {row['drawn']} drawn from {row['rows']} rows (repeated)" if row["repeated"] else ""
        lines.append(
            f"  {row['source']} {row['path']} [{row['format']}]: {row['examples']} examples "
            f"({row['examples_share']:.1%}), {row['tokens']:,} tokens ({row['tokens_share']:.1%}), "
            f"{row['label_tokens']:,} label tokens ({row['label_tokens_share']:.1%}){repeated}"
        )
    return lines
