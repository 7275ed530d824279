"""Packing: several tokenized examples in one row of at most `max_length` tokens, so little of a batch is padding.

A packed row keeps each example's own positions (its `position_ids` restart at 0) and masks the label of each
example's first token, which the unpacked loss never predicts either (nothing comes before it). The model then
sees no attention mask, only the restarting positions: transformers turns them into a block-diagonal mask
(sdpa, eager, flex) or varlen flash attention, so no example attends to another. Whether a model family and
backend really honour that is checked on the real model before training (`train/fast_path.py`).

Rows are filled first-fit-decreasing, which depends only on the lengths: the same data gives the same rows.
The training sampler then shuffles rows, with the run's seed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from peftcli.data.formats import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to at most `capacity`.

    Longest first, each into the first bin (in creation order) with room; ties in length keep index order.
    A tree over the bins' free space finds that bin in log time, so a million examples pack in seconds.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [0] * (2 * size)  # free[size + b]: room left in bin b (0 until the bin exists); inner nodes: max below
    bins: list[list[int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than the row capacity {capacity}")
        if free[1] >= length:
            node = 1
            while node < size:  # descend to the leftmost bin with room
                node = 2 * node if free[2 * node] >= length else 2 * node + 1
            slot = node - size
            bins[slot].append(index)
        else:
            slot = len(bins)
            bins.append([index])
            node = size + slot
            free[node] = capacity
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def packed_row(examples: list[dict]) -> dict:
    """One row of examples: input_ids and labels joined, position_ids restarting at each example."""
    input_ids, labels, positions = [], [], []
    for example in examples:
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX, *example["labels"][1:]]  # nothing before an example predicts its first token
        positions += range(len(example["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


class PackedDataset(Dataset):
    """Rows of packed examples over a tokenized causal-LM dataset (columns input_ids and labels)."""

    def __init__(self, examples, max_length: int):
        self.input_ids = [list(ids) for ids in examples["input_ids"]]
        self.labels = [list(labels) for labels in examples["labels"]]
        self.rows = first_fit_decreasing([len(ids) for ids in self.input_ids], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> dict:
        return packed_row([{"input_ids": self.input_ids[i], "labels": self.labels[i]} for i in self.rows[row]])

    def lengths(self) -> list[int]:
        """Tokens per row."""
        return [sum(len(self.input_ids[i]) for i in row) for row in self.rows]


def padding_share(lengths: list[int], batch_size: int, order: list[int]) -> float:
    """The share of a padded batch that is padding, batching `lengths` in `order`, `batch_size` at a time."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 0.0 if padded == 0 else 1.0 - real / padded


def shuffled(count: int, seed: int) -> list[int]:
    """A seeded permutation, for figures that depend on batch order (the loader draws its own)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator).tolist()
