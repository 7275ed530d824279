"""`peft runs plot RUN...` (curves of several runs overlaid) and `peft runs compare RUN...` (their summaries
side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

runs_app = typer.Typer(help="Look at runs: their curves overlaid, their summaries side by side.", no_args_is_help=True)


@runs_app.command("plot")
def plot(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run directories (output.dir of peft train)."),
    output: Path = typer.Option(Path("runs.png"), "-o", "--output", help="The PNG file to write."),
    metric: list[str] = typer.Option(
        [],
        "--metric",
        metavar="NAME",
        help="A metrics.jsonl key to draw (repeat for several); default: loss, eval_loss, lr and "
        "the accuracies and reward margins the runs logged.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file if it exists."),
) -> None:
    """Overlay the curves of several runs, one panel per metric and one colour per run."""
    from peftcli.errors import OutputError
    from peftcli.train.curves import overlay_figure, read_run, write_png

    if output.suffix.lower() != ".png":
        raise OutputError(f"-o {output}: the picture is a PNG; give a file name ending in .png")
    if output.exists() and not overwrite:
        raise OutputError(f"{output} exists; pass --overwrite to replace it, or -o another file")
    if not output.parent.is_dir():
        raise OutputError(f"-o {output}: the folder {output.parent} does not exist")
    loaded = [read_run(run) for run in runs]  # every run checked before anything is drawn
    write_png(overlay_figure(loaded, metric or None), output)
    typer.echo(f"wrote {output} ({len(loaded)} runs)")


@runs_app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run directories (output.dir of peft train)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of rows, raw numbers, for scripts."),
) -> None:
    """A table of the runs' summaries: method, steps, losses, accuracy, time and peak memory."""
    from rich.box import SIMPLE_HEAD
    from rich.table import Table

    from peftcli.cli.console import make_console
    from peftcli.train.curves import read_run
    from peftcli.train.run_compare import compare_row

    rows = [compare_row(read_run(run)) for run in runs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = make_console()
    columns = ("run", "method", "objective", "steps", "trainable", "train loss", "eval loss")
    # On a terminal, a ruled header; in a pipe, plain columns aligned with spaces (easy to grep and diff).
    table = Table(*columns, "accuracy", "time", "peak memory", box=SIMPLE_HEAD if console.is_terminal else None)
    for index in (3, 4, 5, 6, 8, 9):
        table.columns[index].justify = "right"
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(
            row["run"] + ("" if row["finished"] else " (unfinished)"),
            row["method"],
            row["objective"],
            str(row["steps"]),
            _count(row["trainable_params"]),
            _number(row["final_train_loss"]),
            _change(row["eval_loss_before"], row["eval_loss_after"], _number),
            _accuracy(row),
            "-" if row["time_s"] is None else f"{row['time_s']:.1f}s",
            _memory(row),
        )
    console.print(table)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _change(before: float | None, after: float | None, show) -> str:
    """`before -> after`, or the one value there is."""
    if before is None:
        return show(after)
    return f"{show(before)} -> {show(after)}"


def _accuracy(row: dict) -> str:
    if row["accuracy_metric"] is None:
        return "-"
    return f"{row['accuracy_metric']} {_change(row['accuracy_before'], row['accuracy_after'], _percent)}"


def _memory(row: dict) -> str:
    """The accelerator's peak when the run used one, else the process's resident peak."""
    if row["peak_device_memory_bytes"] is not None:
        return f"{row['peak_device_memory_bytes'] / 2**30:.2f} GiB GPU"
    if row["peak_host_memory_bytes"] is not None:
        return f"{row['peak_host_memory_bytes'] / 2**30:.2f} GiB RSS"
    return "-"
