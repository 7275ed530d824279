"""`peft objectives [NAME]`: the objective registry as a table, or one objective's options."""

from __future__ import annotations

import typer


def objectives(name: str | None = typer.Argument(None, metavar="[NAME]", help="An objective to describe.")) -> None:
    """List the training objectives (what the loss is) and what each needs, or show one objective's options."""
    from rich.markup import escape
    from rich.table import Table

    from peftcli.cli.console import make_console
    from peftcli.errors import PeftCliError
    from peftcli.objectives.registry import all_objectives
    from peftcli.recipe.errors import suggest

    console = make_console()
    found = all_objectives()
    if name is not None and name not in found:
        raise PeftCliError(f"unknown objective {name!r}{suggest(name, list(found))}; `peft objectives` lists them")
    if name is None:
        table = Table("objective", "data", "reference", "tasks", "what it does", box=None)
        for spec in found.values():
            caps = spec.capabilities
            data = {"pairs": "preference pairs", "unpaired": "unpaired examples"}.get(caps.data, "the task's formats")
            reference = "starting policy" if caps.reference else "-"
            table.add_row(spec.name, data, reference, ", ".join(caps.tasks), escape(spec.summary))
        console.print(table)
        console.print("`peft objectives NAME` shows an objective's options; set them under `objective:` in a recipe.")
        return
    spec = found[name]
    console.print(f"[bold]{spec.name}[/bold]: {escape(spec.summary)}")
    table = Table("option", "default", "description", box=None)
    for field_name, field in spec.options.model_fields.items():
        if field_name != "name":
            table.add_row(field_name, escape(repr(field.get_default())), escape(field.description or ""))
    console.print(table)
