"""`peft data inspect RECIPE`: examples as the model will see them, trained tokens marked, and split statistics."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from peftcli.cli.recipe import SET_HELP
from peftcli.errors import DataError

SPLITS = ("train", "validation")
BAR_WIDTH = 40
OPEN, CLOSE = "[[", "]]"  # plain marker around trained tokens: survives a pipe and copy-paste
NEWLINE = "↵"


def inspect(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    count: int = typer.Option(3, "-n", "--examples", min=0, metavar="N", help="How many examples to show."),
    split: str = typer.Option("train", "--split", metavar="train|validation", help="Which split to show."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (token ids, labels, figures) instead of text."),
) -> None:
    """Show examples as training gets them (trained tokens marked) and the split's statistics; loads the
    tokenizer and data only, no model weights."""
    from peftcli.cli.console import make_console
    from peftcli.recipe.load import load_recipe

    if split not in SPLITS:
        raise DataError(f"--split: {split!r} is not a split; use train or validation")
    recipe = load_recipe(recipe_file, overrides)
    if split == "validation" and recipe.data.validation is None:  # refused before anything loads
        raise DataError("data.validation: the recipe has no validation split; set data.validation or use --split train")
    report = build_report(recipe, split, count)
    if as_json:
        from peftcli.data.inspect import report_as_dict

        typer.echo(json.dumps(report_as_dict(report), indent=2))
        return
    print_report(report, make_console())


def build_report(recipe, split: str, count: int):
    """Tokenizer, prepared data and the loop's batching decision for the recipe, as one split's report."""
    from peftcli.data.inspect import inspect_split
    from peftcli.data.prepare import prepare_data
    from peftcli.models.load import load_tokenizer, planned_attention
    from peftcli.objectives.registry import get_objective
    from peftcli.train.fast_path import packing_wanted
    from peftcli.tuners.registry import get_tuner

    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe, tokenizer)
    # As set_up in train/loop.py decides it: two-row examples never pack.
    pairs = get_objective(recipe.objective.name).capabilities.preference_data
    capable = get_tuner(recipe.method.name).capabilities.packing and not pairs
    packing = packing_wanted(recipe, capable, planned_attention(recipe.model))
    launch = recipe.launch
    processes = launch.nproc * launch.nnodes if launch is not None and launch.nproc else 1
    return inspect_split(recipe, tokenizer, prepared, split, count, packing, processes)


def visible(text: str) -> str:
    """Line ends and tabs shown as marks (the line still breaks), so a template's whitespace can be checked."""
    return text.replace("\t", "→").replace("\n", f"{NEWLINE}\n")


def marked_text(row, plain: bool):
    """A row's text: trained runs green and context dim on a terminal; trained runs in [[ ]] in plain text."""
    from rich.text import Text

    out = Text()
    inside = False  # within a trained run (special and plain tokens of one run share a marker)
    for segment in row.segments:
        text = visible(segment.text)
        if plain:
            if segment.trained != inside:
                out.append(OPEN if segment.trained else CLOSE)
                inside = segment.trained
            out.append(text)
        else:
            style = "green" if segment.trained else "dim"
            out.append(text, style=f"bold {style}" if segment.special else style)
    if inside:
        out.append(CLOSE)
    return out


def example_header(report, example, row) -> str:
    where = f"example {example.index} of {report.split}" + (f", {row.name}" if row.name else "")
    cut = "truncated to max_length" if example.truncated else "not truncated"
    label = f", label {example.label}" if example.label is not None and not row.name else ""
    trained = "its label trained" if report.task == "seq_cls" else f"{row.trained_tokens} trained"
    return f"── {where}: {len(row.input_ids)} tokens, {trained}, {cut}{label}"


def histogram_lines(report, bar: str) -> list[str]:
    top = max((n for _, _, n in report.histogram), default=0) or 1
    width = len(str(report.max_length))
    lines = []
    for lo, hi, n in report.histogram:
        marker = f"  ◀ max_length {report.max_length}" if hi == report.max_length else ""
        lines.append(f"  {lo:>{width}}-{hi:<{width}} {bar * round(BAR_WIDTH * n / top):<{BAR_WIDTH}} {n:,}{marker}")
    return lines


def statistics_lines(report) -> list[str]:
    stats = report.stats
    lines = [
        f"{report.split}: {stats.examples:,} examples, {stats.dropped_no_labels:,} dropped (no trained tokens), "
        f"{stats.truncated:,} truncated to max_length {report.max_length}",
        f"tokens: {stats.tokens:,}, trained {stats.label_tokens:,} ({report.label_share:.1%})",
    ]
    if report.task == "seq_cls":  # one label per example, not a token
        lines[1] = f"tokens: {stats.tokens:,}; one trained label per example"
    if report.packing_efficiency is not None:
        lines.append(
            f"batches of {report.batch_size} rows: packed into {report.packed_rows:,} rows, filled "
            f"{report.packing_efficiency:.1%} (packing efficiency), padding {report.padding_share:.1%}"
        )
    else:
        lines.append(f"batches of {report.batch_size}: {report.batches}, padding {report.padding_share:.1%}")
    for source in stats.mix if len(stats.mix) > 1 else []:  # data.train as a list of sources
        lines.insert(
            len(lines) - 1,
            f"  {source['source']}: {source['examples']:,} examples ({source['examples_share']:.1%}), "
            f"{source['label_tokens_share']:.1%} of trained tokens, {source['truncated']:,} truncated",
        )
    if stats.label_counts:
        lines.append("labels: " + ", ".join(f"{name} {n:,}" for name, n in stats.label_counts.items()))
    return lines


def print_report(report, console) -> None:
    """The examples, then the statistics; colour on a terminal, plain markers anywhere else."""
    plain = not console.is_terminal or console.no_color or console.color_system is None
    if not report.examples:
        console.print(f"(no examples shown from {report.split})", markup=False, soft_wrap=True)
    elif plain:
        console.print(
            f"legend: {OPEN}trained tokens{CLOSE}, the rest is context; {NEWLINE} ends a line",
            markup=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"legend: [green]trained tokens[/green], [dim]context[/dim]; {NEWLINE} ends a line", soft_wrap=True
        )
    for example in report.examples:
        for row in example.rows:
            console.print(example_header(report, example, row), markup=False, soft_wrap=True)
            console.print(marked_text(row, plain), soft_wrap=True)
    console.print()
    for line in statistics_lines(report):
        console.print(line, markup=False, soft_wrap=True)
    console.print("lengths (tokens per example):", markup=False, soft_wrap=True)
    for line in histogram_lines(report, "#" if plain else "█"):
        console.print(line, markup=False, soft_wrap=True)
