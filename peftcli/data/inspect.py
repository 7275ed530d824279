"""What `peft data inspect` shows: examples as training receives them, their trained tokens, and split figures.

Nothing here renders or masks on its own: examples and counts come from `prepare_data` (the Renderer training
uses), and batching figures from the loop's own pieces (PackedDataset, LengthGroupedSampler, padding_share), so a
broken chat template or mask shows here exactly as it would train.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from peftcli.data.formats import IGNORE_INDEX
from peftcli.data.prepare import PreparedData, SplitStats

HISTOGRAM_BINS = 10
# Second rows of a two-row example (formats.py): preference pairs, unpaired examples with their kl row.
SECOND_ROWS = {"rejected": ("chosen", "rejected"), "mismatched": ("completion", "mismatched")}


@dataclass
class Segment:
    """A run of tokens decoded together: all trained or all context, and special or not."""

    text: str
    trained: bool
    special: bool = False


@dataclass
class ShownRow:
    """One token sequence of an example (its only one, or one side of a pair)."""

    name: str  # "" for a single row; "chosen"/"rejected", "completion"/"mismatched", "input"/"target" (seq2seq)
    input_ids: list[int]
    labels: list[int]
    segments: list[Segment]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class ShownExample:
    """One prepared example: its rows, whether it was cut to max_length, and its label where it has one."""

    index: int
    rows: list[ShownRow]
    truncated: bool
    label: str | None = None  # seq_cls: the class; token_cls: the word tags; unpaired: desirable or not


@dataclass
class SplitReport:
    """One split: a few examples and the figures training will see."""

    split: str
    task: str
    stats: SplitStats
    examples: list[ShownExample]
    max_length: int
    histogram: list[tuple[int, int, int]]  # (lowest, highest, examples) per bin of example length
    batch_size: int
    batches: str  # packed, length-grouped, random (train) or in order (validation)
    padding_share: float
    packing_efficiency: float | None = None  # share of packed row slots holding tokens
    packed_rows: int | None = None

    @property
    def label_share(self) -> float:
        return self.stats.label_tokens / self.stats.tokens if self.stats.tokens else 0.0


def segments_of(tokenizer, input_ids: list[int], trained: list[bool]) -> list[Segment]:
    """Runs of equal (trained, special) state, each decoded as a whole (a character split over tokens stays whole)."""
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    segments: list[Segment] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        state = (trained[start], input_ids[start] in special_ids)
        if end < len(input_ids) and (trained[end], input_ids[end] in special_ids) == state:
            continue
        text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        segments.append(Segment(text, *state))
        start = end
    return segments


def _row(tokenizer, name: str, input_ids: list[int], labels: list[int]) -> ShownRow:
    trained = [x != IGNORE_INDEX for x in labels]
    return ShownRow(name, list(input_ids), list(labels), segments_of(tokenizer, input_ids, trained))


def shown_example(tokenizer, example: dict, index: int, truncated: bool, task: str,
                  label_names: list[str] | None = None) -> ShownExample:  # fmt: skip
    """An example of a prepared split as rows of marked text."""
    ids, labels = example["input_ids"], example["labels"]
    if isinstance(labels, int):  # seq_cls: the class is the only label; every input token is context
        return ShownExample(index, [_row(tokenizer, "", ids, [IGNORE_INDEX] * len(ids))], truncated,
                            label_names[labels] if label_names else str(labels))  # fmt: skip
    if task == "seq2seq":  # the encoder reads the input; the labels are the decoder's target
        rows = [_row(tokenizer, "input", ids, [IGNORE_INDEX] * len(ids)), _row(tokenizer, "target", labels, labels)]
        return ShownExample(index, rows, truncated)
    label = None
    if label_names is not None:  # token_cls: each labelled token's tag, in order
        label = " ".join(label_names[x] for x in labels if x != IGNORE_INDEX)
    rows = [_row(tokenizer, "", ids, labels)]
    for second, names in SECOND_ROWS.items():
        if f"{second}_input_ids" in example:
            rows = [
                _row(tokenizer, names[0], ids, labels),
                _row(tokenizer, names[1], example[f"{second}_input_ids"], example[f"{second}_labels"]),
            ]
    if "desirable" in example:
        label = "desirable" if example["desirable"] else "undesirable"
    return ShownExample(index, rows, truncated, label)


def example_lengths(dataset) -> list[int]:
    """Tokens per example as the loop batches them: a two-row example counts its longer row."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    for second in SECOND_ROWS:
        if f"{second}_input_ids" in dataset.column_names:
            lengths = [max(a, len(b)) for a, b in zip(lengths, dataset[f"{second}_input_ids"], strict=True)]
    return lengths


def length_histogram(lengths: list[int], max_length: int, bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """Example counts in `bins` near-equal ranges of 1..max_length (the last ends at max_length)."""
    bins = min(bins, max_length)
    starts = [1 + k * max_length // bins for k in range(bins)]
    ends = [start - 1 for start in starts[1:]] + [max_length]
    counts = [0] * bins
    for length in lengths:
        counts[max(0, bisect.bisect_right(starts, length) - 1)] += 1
    return list(zip(starts, ends, counts, strict=True))


def batching_figures(dataset, lengths: list[int], split: str, batch_size: int, max_length: int, packing: bool,
                     group_by_length: bool, seed: int, processes: int = 1) -> dict:  # fmt: skip
    """How the loop (train/loop.py: _data) batches this split, and the padding share and packing fill it leaves.

    Train: packed rows in a seeded random order, or length-grouped, or random. Validation: in order, packed when
    training packs."""
    from peftcli.data.packing import PackedDataset, padding_share, shuffled
    from peftcli.data.sampler import LengthGroupedSampler

    if packing:
        rows = PackedDataset(dataset, max_length).lengths()
        order = shuffled(len(rows), seed) if split == "train" else list(range(len(rows)))
        return {
            "batches": "packed",
            "padding_share": padding_share(rows, batch_size, order),
            "packing_efficiency": sum(rows) / (len(rows) * max_length),
            "packed_rows": len(rows),
        }
    if split != "train":
        return {"batches": "in order", "padding_share": padding_share(lengths, batch_size, list(range(len(lengths))))}
    if group_by_length:
        sampler = LengthGroupedSampler(lengths, batch_size * processes, seed)
        return {"batches": "length-grouped", "padding_share": padding_share(lengths, batch_size, list(sampler))}
    return {"batches": "random", "padding_share": padding_share(lengths, batch_size, shuffled(len(lengths), seed))}


def inspect_split(recipe, tokenizer, prepared: PreparedData, split: str, count: int, packing: bool,
                  processes: int = 1) -> SplitReport:  # fmt: skip
    """The first `count` examples of a prepared split, marked, with the split's statistics and batching."""
    dataset = prepared.train if split == "train" else prepared.validation
    cut = prepared.truncated[split]
    examples = [
        shown_example(tokenizer, dataset[i], i, cut[i], recipe.model.task, prepared.label_names)
        for i in range(min(count, len(dataset)))
    ]
    lengths = example_lengths(dataset)
    data, training = recipe.data, recipe.training
    figures = batching_figures(dataset, lengths, split, training.batch_size, data.max_length, packing,
                               data.group_by_length, training.seed, processes)  # fmt: skip
    return SplitReport(
        split=split,
        task=recipe.model.task,
        stats=prepared.stats[split],
        examples=examples,
        max_length=data.max_length,
        histogram=length_histogram(lengths, data.max_length),
        batch_size=training.batch_size,
        **figures,
    )


def report_as_dict(report: SplitReport) -> dict:
    """The report as plain JSON-able data (token ids included, for scripts that check a mask)."""
    rows = [
        {
            "index": e.index,
            "truncated": e.truncated,
            "label": e.label,
            "rows": [
                {
                    "name": r.name,
                    "tokens": len(r.input_ids),
                    "trained_tokens": r.trained_tokens,
                    "input_ids": r.input_ids,
                    "labels": r.labels,
                    "segments": [{"text": s.text, "trained": s.trained, "special": s.special} for s in r.segments],
                }
                for r in e.rows
            ],
        }
        for e in report.examples
    ]
    return {
        "split": report.split,
        "task": report.task,
        "stats": vars(report.stats),
        "label_share": report.label_share,
        "max_length": report.max_length,
        "histogram": [{"from": lo, "to": hi, "examples": n} for lo, hi, n in report.histogram],
        "batch_size": report.batch_size,
        "batches": report.batches,
        "padding_share": report.padding_share,
        "packing_efficiency": report.packing_efficiency,
        "packed_rows": report.packed_rows,
        "examples": rows,
    }
