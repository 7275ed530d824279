"""Tokenization progress as plain lines (CI logs, pipes, the training reporter): counts, rate and ETA, at most
one line per interval per split, and always one when a split is done. Nothing is printed here: each line goes
to the `emit` function the caller gives."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressLines:
    """A `progress(key, done, total)` callback for `prepare_data` that emits a line now and then."""

    def __init__(self, emit: Callable[[str], None], interval: float = 10.0, now=time.monotonic) -> None:
        self.emit, self.interval, self.now = emit, interval, now
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, key: str, done: int, total: int) -> None:
        now = self.now()
        started = self.started.setdefault(key, now)
        elapsed = now - started
        if done >= total:
            rate = f" ({done / elapsed:,.0f} examples/s)" if elapsed > 0 else ""
            self.emit(f"tokenized {key}: {total:,} examples in {clock(elapsed)}{rate}")
            return
        if elapsed <= 0 or now - self.last.get(key, started) < self.interval:
            return
        self.last[key] = now
        rate = done / elapsed
        eta = (total - done) / rate
        self.emit(
            f"tokenizing {key}: {done:,}/{total:,} examples ({done / total:.0%}), {rate:,.0f}/s, "
            f"elapsed {clock(elapsed)}, eta {clock(eta)}"
        )


def clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
