"""Signals outside a training loop (merge, export, loading a recipe): the command ends through the normal
exception path, so staged outputs are removed (train/safe_write.py), and the user reads one line saying so
instead of nothing. A training loop listens on its own (train/preemption.py) to checkpoint first."""

from __future__ import annotations

import signal

ENDING_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP")  # Ctrl-C, and what schedulers and terminals send


class Interrupted(BaseException):
    """A command ended by a signal. A BaseException, as KeyboardInterrupt is: no `except Exception` swallows it,
    while cleanup in `finally` and `except BaseException` still runs."""

    def __init__(self, number: int, message: str | None = None):
        self.number = number
        self.exit_code = 128 + number
        name = signal.Signals(number).name
        super().__init__(message or f"interrupted by {name}; nothing half-written was left behind")


def _raise(number: int, _frame) -> None:
    raise Interrupted(number)


def end_on_signals() -> None:
    """From now on the ending signals raise `Interrupted` (Typer would turn Ctrl-C into a silent exit 130)."""
    for name in ENDING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, _raise)
