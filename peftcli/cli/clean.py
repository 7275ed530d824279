"""`peft clean DIR`: remove what killed peftcli commands left behind in DIR and the directories directly in it."""

from __future__ import annotations

from pathlib import Path

import typer


def clean(
    directory: Path = typer.Argument(..., metavar="DIR", help="A runs folder, a run directory or an output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
) -> None:
    """Remove leftovers of interrupted runs, merges and exports: staging directories and temporary files of
    processes that are gone, stale run locks, and checkpoints that were never completed. What live processes
    are writing is left alone."""
    from peftcli.errors import PeftCliError
    from peftcli.train.run_dir import leftovers_under, remove_leftover
    from peftcli.train.safe_write import size_of

    if not directory.is_dir():
        raise PeftCliError(f"{directory}: not a directory")
    found = leftovers_under(directory)
    total = 0
    for path, why in found:
        size = size_of(path)
        total += size
        if not dry_run:
            remove_leftover(path)
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path} ({size / 1e6:.1f} MB): {why}")
    if not found:
        typer.echo(f"nothing to clean in {directory}")
    else:
        typer.echo(f"{len(found)} leftover(s); {'would free' if dry_run else 'freed'} {total / 1e6:.1f} MB")
