"""Length-grouped batches: when examples are not packed, batch examples of similar length so little is padding.

Each epoch draws a seeded permutation, cuts it into groups of 64 batches, sorts each group by length and
cuts it into batches, then shuffles the batches. Batches stay random in content across groups; within a
batch lengths are close. The batch holding the longest example goes first, so a run that cannot fit its
longest batch in memory fails at its first step, not hours in.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

GROUP_BATCHES = 64


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive `batch_size` runs have similar lengths; `set_epoch` reshuffles."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        group = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(order), group):
            members = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        # A short batch (the data's remainder) stays last: the loader must see full batches before it.
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda b: max(self.lengths[i] for i in full[b]))
            full.insert(0, full.pop(longest))
        return full + rest

    def __iter__(self):
        for batch in self.batches():
            yield from batch
