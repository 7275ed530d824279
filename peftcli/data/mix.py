"""Several training sources as one set: how many examples each gives, which of its rows, and in which order.

The rule (the README's Data section says it to users):
- weights on every entry: source i gets the share w_i / sum(w) of the mix, and the mix is the largest one with
  those shares in which no source gives a row twice: N = floor(min_i rows_i / share_i) examples, split by
  largest remainder, so the counts add up to N exactly and none exceeds its source. Which rows: a seeded
  random subset.
- no weights: an entry with `samples` gives exactly that many (a seeded random subset; more than the source
  has gives every row the same number of times, and a seeded random subset of rows once more); an entry
  without it gives all its rows.
Everything is drawn from the seed alone (data.shuffle_seed, else training.seed), so every process of a run,
and a resumed run, builds the same mix.
"""

from __future__ import annotations

import math
from fractions import Fraction

from peftcli.errors import DataError

# Streams of one seed: the train order, the validation order, then one per source for its rows.
TRAIN_ORDER, VALIDATION_ORDER, FIRST_SOURCE = 0, 1, 2


def _generator(seed: int, stream: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def mix_counts(rows: list[int], weights: list[float | None], samples: list[int | None], keys: list[str]) -> list[int]:
    """How many examples each source gives the mix (see the module's rule); `keys` name them in errors."""
    if not all(w is not None for w in weights):
        return [n if k is None else k for n, k in zip(rows, samples, strict=True)]
    exact = [Fraction(repr(w)) for w in weights]  # 0.7 as the decimal written, not its nearest binary float
    shares = [w / sum(exact) for w in exact]
    size = min(math.floor(n / share) for n, share in zip(rows, shares, strict=True))
    quotas = [share * size for share in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    for key, count, share in zip(keys, counts, shares, strict=True):
        if count == 0:
            raise DataError(
                f"{key}.weight: a share of {float(share):.3%} of the {size} examples the mix can hold without "
                "repeating rows gives this source none; raise its weight, or use samples on every entry"
            )
    return counts


def draw_rows(rows: int, count: int, seed: int, source: int) -> list[int]:
    """`count` row indices of a source of `rows` rows: every row count // rows times (each round in file order,
    so neighbours are different rows), then a seeded random subset of count % rows rows, in file order."""
    import torch

    whole, rest = divmod(count, rows)
    subset = torch.randperm(rows, generator=_generator(seed, FIRST_SOURCE + source))[:rest].tolist()
    return list(range(rows)) * whole + sorted(subset)


def mixed_order(total: int, seed: int, stream: int = TRAIN_ORDER) -> list[int]:
    """A seeded permutation of the examples of all sources (concatenated source after source)."""
    import torch

    return torch.randperm(total, generator=_generator(seed, stream)).tolist()
