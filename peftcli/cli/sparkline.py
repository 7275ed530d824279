"""A curve in one line of text (`▇▆▄▃▂▁`), for the end of `peft train` on a terminal."""

from __future__ import annotations

import math

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """`values` drawn as at most `width` block characters, lowest to highest; a long curve is averaged into
    `width` equal buckets. Non-finite values (a NaN loss) are left blank."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for index in range(buckets):
        chunk = values[index * len(values) // buckets : (index + 1) * len(values) // buckets]
        finite = [v for v in chunk if math.isfinite(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
        return " " * buckets
    low, high = min(finite), max(finite)
    span = high - low
    top = len(BLOCKS) - 1
    return "".join(
        " " if not math.isfinite(m) else BLOCKS[round((m - low) / span * top) if span > 0 else top // 2] for m in means
    )
