"""`peft recipe validate|show|schema|import`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from peftcli.errors import PeftCliError, RecipeError

SET_HELP = "Override a recipe key, typed against the schema: --set training.max_steps=10 (repeatable)."


def validate(
    files: list[Path] = typer.Argument(..., metavar="RECIPE", help="Recipe files to check."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Check recipe files; every problem of every file is reported, one line each."""
    from peftcli.recipe.load import load_recipe

    problems: list[str] = []
    for path in files:
        try:
            load_recipe(path, overrides)
            typer.echo(f"ok: {path}")
        except PeftCliError as error:
            problems.extend(error.lines())
    if problems:
        raise RecipeError(problems)


def show(
    file: Path = typer.Argument(..., help="Recipe file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the resolved recipe: overrides applied, defaults filled in."""
    from peftcli.recipe.load import load_recipe, recipe_to_dict, recipe_to_yaml

    recipe = load_recipe(file, overrides)
    typer.echo(json.dumps(recipe_to_dict(recipe), indent=2) if as_json else recipe_to_yaml(recipe), nl=False)
    if as_json:
        typer.echo()


def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the recipe JSON Schema (for editor completion: yaml-language-server, VS Code)."""
    from peftcli.recipe.schema import Recipe

    document = Recipe.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "peftcli recipe"
    text = json.dumps(document, indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}")


def import_recipe(
    file: Path = typer.Argument(..., help="The other tool's training config (YAML or JSON)."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Recipe file to write. Default: beside FILE, its name ending in .peftcli.yaml instead "
        "(qlora.yml -> qlora.peftcli.yaml).",
    ),
    source: str | None = typer.Option(
        None,
        "--from",
        metavar="TOOL",
        help="axolotl, llama-factory, hf (a flat file of HF TrainingArguments and TRL keys), ms-swift or oumi. "
        "Default: detected from the keys.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Convert an Axolotl, LLaMA-Factory, HF TrainingArguments/TRL, ms-swift or Oumi config into a recipe.

    Every source key that is not carried over is printed as `key: reason` and written as a comment at the top
    of the recipe; where the source tool's default differs from peftcli's, the recipe states the source's
    value. Local data and model paths are looked up from the current directory, then beside FILE, and written
    absolute. The recipe is validated before it is written.
    """
    from peftcli.recipe.importers import import_config, render, write_atomic

    result = import_config(file, source)
    target = output if output is not None else file.with_name(f"{file.stem}.peftcli.yaml")
    write_atomic(target, render(result), overwrite)
    for item in result.unmapped:
        typer.echo(item.line())
    counted = f"{len(result.unmapped)} key{'s' if len(result.unmapped) != 1 else ''} not carried over"
    typer.echo(f"wrote {target} (from {result.tool}; {counted}, listed above and in its header)")
