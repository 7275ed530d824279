"""Packing into rows (first-fit-decreasing), packed rows and their collation, and length-grouped batches."""

from __future__ import annotations

import random

import pytest

from peftcli.data.collate import PadCollator
from peftcli.data.formats import IGNORE_INDEX
from peftcli.data.packing import PackedDataset, first_fit_decreasing, padding_share, shuffled
from peftcli.data.sampler import LengthGroupedSampler


def _plain_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook quadratic version, as the oracle of the tree-based one."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= lengths[index]
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 512) for _ in range(rng.randint(1, 700))]
    bins = first_fit_decreasing(lengths, 512)
    assert bins == _plain_first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) < len(lengths) or len(lengths) == 1


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the row capacity 8"):
        first_fit_decreasing([3, 9], 8)


def test_packed_rows_restart_positions_and_mask_each_example_start():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
        "labels": [[1, 2, 3], [IGNORE_INDEX, 5], [6, 7, 8, 9], [10]],
    }
    packed = PackedDataset(examples, max_length=6)
    assert packed.rows == [[2, 1], [0, 3]]
    assert packed.lengths() == [6, 4]
    first = packed[0]
    assert first["input_ids"] == [6, 7, 8, 9, 4, 5]
    assert first["position_ids"] == [0, 1, 2, 3, 0, 1]
    assert first["labels"] == [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, 5]

    batch = PadCollator(pad_token_id=0)([packed[0], packed[1]])
    # The second row's padding is a sequence of its own: positions restart, no label, attention mask 0.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]
    assert batch["input_ids"][1].tolist() == [1, 2, 3, 10, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_padding_share_counts_the_padding_of_each_batch():
    assert padding_share([4, 2, 4, 4], 2, [0, 1, 2, 3]) == pytest.approx(2 / 16)
    assert padding_share([4, 2, 4, 4], 2, [0, 2, 1, 3]) == pytest.approx(2 / 16)
    assert padding_share([4, 4], 2, [0, 1]) == 0.0
    assert sorted(shuffled(10, 3)) == list(range(10)) and shuffled(10, 3) == shuffled(10, 3)


def test_length_grouped_batches_are_a_seeded_permutation_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000)) and len(sampler) == 1000
    assert list(sampler) == epoch0  # the same epoch draws the same order (resume relies on it)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(1000)) and epoch1 != epoch0
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=2)) != epoch0
    grouped = padding_share(lengths, 8, epoch0)
    assert grouped < 0.1 < padding_share(lengths, 8, shuffled(1000, 1))
    # The longest example's batch comes first; only the last batch may be short.
    assert max(lengths) == max(lengths[i] for i in epoch0[:8])
    batches = LengthGroupedSampler(list(range(1, 21)), batch_size=8, seed=0).batches()
    assert [len(b) for b in batches] == [8, 8, 4]
