"""`peft data prepare RECIPE`: tokenize the recipe's data once, into the cache that `peft train` reads."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from peftcli.cli.recipe import SET_HELP


def prepare(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Tokenize the recipe's data into the tokenized-data cache, so that `peft train` (every process of a cluster
    job included) only reads it; says so when it is cached already. Loads the tokenizer and data, no model."""
    from peftcli.cli.console import make_console
    from peftcli.data.cache import tokenized_data
    from peftcli.models.load import load_tokenizer
    from peftcli.recipe.load import load_recipe

    recipe = load_recipe(recipe_file, overrides)
    console = make_console(stderr=True)
    tokenizer = load_tokenizer(recipe.model)
    with _progress(console) as progress:
        data, entry = tokenized_data(recipe, tokenizer, progress, must_write=True)
    if entry.note:
        console.print(f"note: {entry.note}", markup=False, soft_wrap=True)
    size = f"{entry.size / 1e6:.1f} MB"
    if entry.reused:
        typer.echo(f"already cached, nothing tokenized: {entry.path} ({size})")
    else:
        typer.echo(f"tokenized data written to {entry.path} ({size})")
    for name in ("train", "validation"):
        split = getattr(data, name)
        if split is None:
            continue
        stats = data.stats[name]
        typer.echo(
            f"  {name}: {len(split):,} examples, {stats.tokens:,} tokens ({stats.label_tokens:,} with labels), "
            f"{stats.truncated:,} truncated to max_length {recipe.data.max_length}, "
            f"{stats.dropped_no_labels:,} dropped (no label tokens)"
        )


@contextmanager
def _progress(console):
    """A `progress(key, done, total)` callback: a live bar per split on a terminal, else plain lines with counts,
    rate and ETA (CI logs)."""
    if not console.is_terminal:
        from peftcli.data.progress_lines import ProgressLines

        yield ProgressLines(lambda line: console.print(line, markup=False, soft_wrap=True))  # one line each in a log
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bars = Progress(
        TextColumn("tokenizing {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, int] = {}

    def update(key: str, done: int, total: int) -> None:
        if key not in tasks:
            tasks[key] = bars.add_task(key, total=total)
        bars.update(tasks[key], completed=done)

    with bars:
        yield update
