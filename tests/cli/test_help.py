"""Every command's --help reads as a person would write it: no Python container types in option metavars.

(typer prints a list argument's type, `<list[Path]>`, whatever its metavar; options honour their metavar.)"""

from __future__ import annotations

import typer.main
from typer.testing import CliRunner

from peftcli.cli.app import app


def _commands(command, path: tuple[str, ...] = ()):
    yield path, command
    if hasattr(command, "commands"):  # a group (typer ships its own click, so no isinstance on click's classes)
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_no_help_page_shows_a_python_type():
    root = typer.main.get_command(app)
    runner = CliRunner()
    pages = 0
    for path, _ in _commands(root):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        options = [line for line in result.output.splitlines() if line.lstrip().startswith("-")]
        for line in options:
            for leak in ("list[", "dict[", "NoneType"):
                assert leak not in line, f"peft {' '.join(path)} --help: {line.strip()}"
        pages += 1
    assert pages > 10


def test_set_option_shows_key_equals_value():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--set KEY=VALUE" in result.output
