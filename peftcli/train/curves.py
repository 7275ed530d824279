"""Pictures of runs: a run's metrics.jsonl drawn as panels (curves.png, written at the end of `peft train`), and
several runs overlaid metric by metric (`peft runs plot`). Matplotlib draws off-screen (Agg), without pyplot's
global state; it is imported inside the functions, so reading a run costs nothing until a figure is drawn."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import OutputError, PeftCliError
from peftcli.train.run_dir import CURVES_FILE, METRICS_FILE, is_run_dir, read_jsonl, read_recipe, read_summary
from peftcli.train.safe_write import temp_name

PANEL_INCHES = (6.0, 3.6)  # width, height of one panel
DPI = 100
COLUMNS = 2
SMOOTH_FROM = 50  # points: below this a curve is drawn as logged, above it a moving mean is drawn over it

# Which metrics share a panel in a run's own figure; a panel appears when the run logged any of them.
# Accuracy-like metrics are shares in [0, 1]: classification accuracy, DPO-style reward accuracy (pairs ranked
# right) and the generation score of sft runs with training.eval_generation.
RUN_PANELS = {
    "loss": ("loss", "eval_loss"),
    "learning rate": ("lr",),  # and lr_<group> for a method group with a rate of its own (LoRA+)
    "accuracy": ("eval_accuracy", "rewards/accuracy", "eval_rewards/accuracy", "gen_score"),
    "reward margin": ("rewards/margin", "eval_rewards/margin"),
}
LABELS = {
    "loss": "train loss",
    "eval_loss": "eval loss",
    "lr": "learning rate",
    "eval_accuracy": "eval accuracy",
    "rewards/accuracy": "train reward accuracy",
    "eval_rewards/accuracy": "eval reward accuracy",
    "gen_score": "generation score",
    "rewards/margin": "train reward margin",
    "eval_rewards/margin": "eval reward margin",
}
# Not curves: counters and bookkeeping every record carries.
NOT_METRICS = {"type", "step", "epoch", "epoch_index", "tokens", "elapsed_s", "eval_tokens", "eval_labels"}
NOT_METRICS |= {"eval_pairs", "eval_examples", "gen_matches", "gen_prompts"}


@dataclass
class RunMetrics:
    """What a run directory says about its training: its records, summary and recipe."""

    path: Path
    records: list[dict]
    summary: dict  # {} while the run is unfinished
    recipe: dict

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def method(self) -> str:
        return self.summary.get("method") or (self.recipe.get("method") or {}).get("name", "?")

    @property
    def objective(self) -> str:
        return self.summary.get("objective") or (self.recipe.get("objective") or {}).get("name", "sft")

    @property
    def title(self) -> str:
        return f"{self.name} ({self.description})"

    @property
    def description(self) -> str:
        """Method and objective, and the task when it is not plain causal language modelling."""
        task = self.summary.get("task") or (self.recipe.get("model") or {}).get("task") or "causal_lm"
        return ", ".join([self.method, self.objective] + ([task] if task != "causal_lm" else []))

    def metric_names(self) -> list[str]:
        """Every metric with at least one number, in the order first logged."""
        names: dict[str, None] = {}
        for record in self.records:
            names.update((k, None) for k, v in record.items() if k not in NOT_METRICS and _number(v) is not None)
        return list(names)


def read_run(path: Path) -> RunMetrics:
    """A run directory's metrics; refused in one line when `path` is not a run directory or logged nothing."""
    path = Path(path)
    if not path.is_dir() or not is_run_dir(path):
        raise OutputError(
            f"{path}: not a run directory (it has no recipe.yaml); give the output.dir of a peft train run"
        )
    records = [r for r in read_jsonl(path / METRICS_FILE) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not records:
        raise OutputError(f"{path / METRICS_FILE}: no metrics logged yet; plot the run after its first logged step")
    return RunMetrics(path, records, read_summary(path), read_recipe(path))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, over the records that hold a number for it (NaN kept: a gap)."""
    points = [(r["step"], _number(r.get(key))) for r in records]
    points = [(step, value) for step, value in points if value is not None]
    return [s for s, _ in points], [v for _, v in points]


def moving_mean(values: list[float]) -> list[float]:
    """A trailing mean over about a 25th of the curve: light enough to keep its shape, NaNs left out."""
    window = max(2, len(values) // 25)
    out = []
    for index in range(len(values)):
        kept = [v for v in values[max(0, index - window + 1) : index + 1] if not math.isnan(v)]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def run_figure(run: RunMetrics):
    """The figure of one run: loss (train and eval), learning rate, and accuracy and reward margin when logged."""
    names = run.metric_names()
    panels = {}
    for title, keys in RUN_PANELS.items():
        wanted = [k for k in keys if k in names]
        if title == "learning rate":
            wanted += [k for k in names if k.startswith("lr_")]
        if wanted:
            panels[title] = wanted
    figure, axes = _grid(len(panels))
    figure.suptitle(run.title)
    for ax, (title, keys) in zip(axes, panels.items(), strict=False):
        for key in keys:
            steps, values = series(run.records, key)
            _draw(ax, key, steps, values, LABELS.get(key, key))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize="small")
    return figure


def overlay_figure(runs: list[RunMetrics], metrics: list[str] | None = None):
    """Several runs on shared axes: one panel per metric, one line (one colour) per run, with a legend."""
    logged = {name for run in runs for name in run.metric_names()}
    if metrics:
        unknown = [m for m in metrics if m not in logged]
        if unknown:
            raise PeftCliError(
                f"--metric {', '.join(unknown)}: not logged by these runs; they logged {', '.join(sorted(logged))}"
            )
    else:
        metrics = [key for keys in RUN_PANELS.values() for key in keys if key in logged]
    figure, axes = _grid(len(metrics))
    figure.suptitle(" vs ".join(run.name for run in runs))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    # Runs are told apart by their directory's name, or by their path when two names are the same.
    names = [run.name for run in runs]
    labels = [f"{run.name if names.count(run.name) == 1 else run.path} ({run.description})" for run in runs]
    for ax, key in zip(axes, metrics, strict=False):
        for run, colour, label in zip(runs, colours, labels, strict=True):
            steps, values = series(run.records, key)
            if steps:
                _draw(ax, key, steps, values, label, colour)
        ax.set_title(LABELS.get(key, key))
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize="small")
    return figure


def write_png(figure, path: Path) -> None:
    """Save a figure whole or not at all (a hidden temporary renamed over `path`), and free it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    tmp = temp_name(path)
    try:
        figure.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        figure.clear()


def write_run_curves(run_dir: Path) -> Path:
    """Draw a run directory's own figure into it (curves.png)."""
    target = Path(run_dir) / CURVES_FILE
    write_png(run_figure(read_run(Path(run_dir))), target)
    return target


def figure_pixels(panels: int) -> tuple[int, int]:
    """Width and height in pixels of a figure of `panels` panels."""
    columns = min(COLUMNS, max(1, panels))
    rows = max(1, math.ceil(panels / columns))
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def _grid(panels: int):
    from matplotlib.figure import Figure

    columns = min(COLUMNS, max(1, panels))
    rows = max(1, math.ceil(panels / columns))
    width, height = figure_pixels(panels)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for spare in axes[panels:]:
        spare.set_visible(False)
    return figure, axes[:panels]


def _draw(ax, key: str, steps: list[int], values: list[float], label: str, colour: str | None = None) -> None:
    """One metric: evaluations (every eval_every steps, or before and after) as dots on a line; a long, noisy
    train curve faint with its moving mean over it; a learning rate as it was."""
    if key.startswith(("eval_", "gen_")):
        ax.plot(steps, values, marker="o", markersize=3, label=label, color=colour)
    elif len(values) >= SMOOTH_FROM and not key.startswith("lr"):
        (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8, label=f"{label} (raw)", color=colour)
        ax.plot(steps, moving_mean(values), linewidth=1.5, label=label, color=raw.get_color())
    else:
        ax.plot(steps, values, linewidth=1.2, label=label, color=colour)


def _number(value) -> float | None:
    """A logged value as a float; None for what is not a number (None, strings, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
