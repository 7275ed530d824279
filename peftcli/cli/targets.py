"""`peft targets RECIPE`: which modules the recipe's method would adapt, without loading any weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from peftcli.cli.recipe import SET_HELP


def targets(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    full: bool = typer.Option(False, "--full", help="List every module name, not just counts per kind."),
) -> None:
    """Show the modules the recipe's method matches and the trainable parameters it would add."""
    from rich.table import Table

    from peftcli.cli.console import make_console
    from peftcli.models.experts import experts_left_out
    from peftcli.recipe.load import load_recipe

    recipe = load_recipe(recipe_file, overrides)
    model, info = adapt_empty_model(recipe)
    console = make_console()
    table = Table("module", "matched", box=None)
    adapted = [*info.targeted, *info.targeted_parameters]
    if full:
        for name in adapted:
            table.add_row(name, "")
    else:
        for short, count in sorted(Counter(n.rsplit(".", 1)[-1] for n in adapted).items()):
            table.add_row(short, str(count))
    console.print(table)
    trainable = info.trainable_count(model)
    total = sum(p.numel() for p in model.parameters())
    parameters = f", {len(info.targeted_parameters)} parameters" if info.targeted_parameters else ""
    console.print(
        f"{recipe.method.name}: {len(info.targeted)} modules{parameters}, {trainable:,} trainable parameters "
        f"({trainable / max(1, total):.3%} of {total:,})",
        highlight=False,
    )
    note = experts_left_out(model, [*info.param_names, *info.targeted_parameters])
    if note:
        console.print(f"note: {note}", highlight=False, markup=False)


def adapt_empty_model(recipe):
    """The recipe's model on the meta device (from its config alone) with the method applied: a target that
    matches nothing fails here, as it would in training."""
    from peftcli.models.load import build_empty_model
    from peftcli.tuners.adapter import apply_adapter
    from peftcli.tuners.protocol import AdapterContext

    labels = [str(label) for label in recipe.data.labels] if recipe.data.labels else None
    model = build_empty_model(recipe.model, **({"label_names": labels} if labels else {}))
    context = AdapterContext(task=recipe.model.task, total_steps=recipe.training.max_steps)
    return model, apply_adapter(model, recipe.method, context)


def adapted_summary(recipe) -> str:
    """One line for the dry-run plan: what the method adapts, checked against the model's config."""
    model, info = adapt_empty_model(recipe)
    trainable = info.trainable_count(model)
    total = sum(p.numel() for p in model.parameters())
    return f"{len(info.targeted)} modules, {trainable:,} trainable parameters ({trainable / max(1, total):.3%})"
