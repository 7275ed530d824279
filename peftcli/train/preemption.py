"""Stopping a run cleanly when asked: SIGTERM and SIGUSR1 (what schedulers send before they kill a job) and
Ctrl-C. The signal only sets a flag; the loop finishes the step it is in, all processes agree to stop at
the same step, write a checkpoint together, and the run ends with `RunStopped`: a message that says how to
continue, and the exit status a shell gives a process killed by that signal (128 + its number).

A second Ctrl-C interrupts at once, for a user who cannot wait for the step to end.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from peftcli.errors import PeftCliError

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class RunStopped(PeftCliError):
    """The run stopped on a signal after writing a checkpoint; `--resume` continues it."""

    def __init__(self, signal_number: int, step: int, total: int, checkpoint: Path):
        self.exit_code = 128 + signal_number
        name = signal.Signals(signal_number).name
        super().__init__(
            f"stopped by {name} after step {step} of {total}; checkpoint written to {checkpoint}; "
            "continue with the same command and --resume"
        )


class StopRequest:
    """Which stop signal arrived first (None while none has)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def _handle(self, number: int, _frame) -> None:
        if self.signal == signal.SIGINT and number == signal.SIGINT:  # asked twice: stop now, without the checkpoint
            from peftcli.interrupts import Interrupted

            raise Interrupted(
                number,
                "interrupted by a second Ctrl-C: stopped at once, without a checkpoint; "
                "--resume continues from the last one",
            )
        if self.signal is None:
            self.signal = number

    @contextmanager
    def listening(self):
        """Handle the stop signals while the run lasts (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
