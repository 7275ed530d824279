"""The `peft` command. Heavy libraries (torch, transformers) are imported inside commands, never here."""

from __future__ import annotations

import sys

import typer

from peftcli import __version__
from peftcli.cli import clean as clean_commands
from peftcli.cli import data as data_commands
from peftcli.cli import data_prepare as data_prepare_commands
from peftcli.cli import eval as eval_commands
from peftcli.cli import export as export_commands
from peftcli.cli import generate as generate_commands
from peftcli.cli import merge as merge_commands
from peftcli.cli import methods as methods_commands
from peftcli.cli import objectives as objectives_commands
from peftcli.cli import recipe as recipe_commands
from peftcli.cli import runs as runs_commands
from peftcli.cli import targets as targets_commands
from peftcli.cli import train as train_commands
from peftcli.errors import PeftCliError

app = typer.Typer(
    name="peft",
    help="Parameter-efficient fine-tuning from YAML recipes.\n\n"
    "Exit codes: 0 success, 2 a problem in your input (recipe, data, paths), 1 anything else.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
recipe_app = typer.Typer(help="Validate, show, describe and import recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(runs_commands.runs_app, name="runs")
data_app = typer.Typer(help="Look at the data as training will see it, and tokenize it ahead.", no_args_is_help=True)
app.add_typer(data_app, name="data")

app.command("train")(train_commands.train)
app.command("targets")(targets_commands.targets)
app.command("merge")(merge_commands.merge)
app.command("export")(export_commands.export)
app.command("eval")(eval_commands.evaluate)
app.command("generate")(generate_commands.generate)
app.command("chat")(generate_commands.chat)
app.command("methods")(methods_commands.methods)
app.command("objectives")(objectives_commands.objectives)
app.command("clean")(clean_commands.clean)
recipe_app.command("validate")(recipe_commands.validate)
recipe_app.command("show")(recipe_commands.show)
recipe_app.command("schema")(recipe_commands.schema)
recipe_app.command("import")(recipe_commands.import_recipe)
data_app.command("inspect")(data_commands.inspect)
data_app.command("prepare")(data_prepare_commands.prepare)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peftcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Parameter-efficient fine-tuning from YAML recipes."""


def print_error(error: PeftCliError) -> None:
    """One line per problem on stderr."""
    for line in error.lines():
        typer.echo(f"error: {line}", err=True)


def main() -> None:
    """Console entry point: user errors exit 2 with one line each; bugs keep their traceback (exit 1)."""
    from peftcli.interrupts import Interrupted, end_on_signals
    from peftcli.train.preemption import RunStopped

    end_on_signals()
    try:
        app()
    except Interrupted as interrupted:
        typer.echo(str(interrupted), err=True)
        sys.exit(interrupted.exit_code)
    except RunStopped as stopped:  # not an error: the run saved itself on request
        typer.echo(str(stopped), err=True)
        sys.exit(stopped.exit_code)
    except PeftCliError as error:
        print_error(error)
        from peftcli.launch.run import report_error_to_launcher

        report_error_to_launcher(error.lines())
        sys.exit(error.exit_code)
