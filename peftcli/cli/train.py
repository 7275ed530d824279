"""`peft train RECIPE`."""

from __future__ import annotations

from pathlib import Path

import typer

from peftcli.cli.recipe import SET_HELP


def train(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; load and train nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output.dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in output.dir."),
) -> None:
    """Fine-tune a model as the recipe says and write the adapter to output.dir."""
    from peftcli.cli.progress import print_plan
    from peftcli.recipe.load import load_recipe
    from peftcli.train.output_dir import check_output_dir

    recipe = load_recipe(recipe_file, overrides)
    mode = check_output_dir(Path(recipe.output.dir), resume, overwrite)
    if dry_run:
        print_plan(recipe, mode)
        return

    from peftcli.cli.progress import RichReporter
    from peftcli.train.loop import train as run

    run(recipe, resume=resume, overwrite=overwrite, reporter=RichReporter())
