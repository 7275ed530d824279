"""The one place that makes rich consoles for the CLI.

Off a terminal (a pipe, a CI log) rich assumes 80 columns: tables squeeze names into `bottle…` and long
lines wrap mid-word, which breaks grep. There a console takes a wide fixed width and never wraps text;
a terminal keeps its own width.
"""

from __future__ import annotations

from rich.console import Console

PLAIN_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, width=PLAIN_WIDTH, soft_wrap=True)
