"""`peft data inspect`'s library side: figures that equal what prepare_data and the training loop compute, and
a reasoning chat template's trained tokens as shown."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest

from peftcli.data.formats import IGNORE_INDEX
from peftcli.data.inspect import inspect_split, length_histogram
from peftcli.data.prepare import prepare_data
from peftcli.examples.tiny import build_reasoning_tokenizer, write_jsonl
from peftcli.recipe.schema import Recipe

from support import make_recipe

CONVERSATION = [
    {"role": "user", "content": "copy alpha"},
    {"role": "assistant", "content": "<think>\nthe word is alpha\n</think>\n\nalpha"},
    {"role": "user", "content": "count one"},
    {"role": "assistant", "content": "<think>\nafter one comes two\n</think>\n\none two"},
]


def _recipe(tmp_path: Path, model_dir: Path, data: Path, max_length: int, **data_options) -> Recipe:
    raw = make_recipe(tmp_path, model_dir, data)
    raw["data"].update(max_length=max_length, **data_options)
    raw["training"]["batch_size"] = 4
    return Recipe.model_validate(raw)


class _OneProcess:  # what the loop's data set-up asks of its accelerator
    num_processes = 1

    def main_process_first(self):
        return nullcontext()

    local_main_process_first = main_process_first


class _Quiet:
    def message(self, text: str) -> None: ...


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path):
    from peftcli.models.load import load_tokenizer
    from peftcli.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)))


@pytest.mark.parametrize("packing", [False, True])
def test_figures_equal_prepare_data_and_the_loops_batching(
    tmp_path: Path, tiny_model_dir: Path, copy_data: Path, tiny_tokenizer, packing: bool, monkeypatch
) -> None:
    from peftcli.train.loop import _data

    monkeypatch.setenv("PEFTCLI_DATA_CACHE", str(tmp_path / "cache"))  # the loop may cache tokenized data

    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, max_length=32, packing=packing)
    prepared = prepare_data(recipe, tiny_tokenizer)
    report = inspect_split(recipe, tiny_tokenizer, prepared, "train", 3, packing)
    stats = prepared.stats["train"]
    assert report.stats == stats and stats.truncated > 0  # copy-task examples are 25-44 tokens
    assert report.label_share == stats.label_tokens / stats.tokens

    _, _, loader, _, batching = _data(recipe, _OneProcess(), _Quiet(), packing)
    assert batching["batches"] == report.batches == ("packed" if packing else "length-grouped")
    assert report.padding_share == batching["padding_share"][report.batches]
    if packing:
        rows = loader.dataset.lengths()
        assert report.packed_rows == len(rows)
        assert report.packing_efficiency == pytest.approx(stats.tokens / (len(rows) * 32))
    else:
        assert report.packing_efficiency is None

    # Shown examples are the first of the prepared split, trained tokens exactly its labels.
    assert [e.index for e in report.examples] == [0, 1, 2]
    for shown in report.examples:
        row = prepared.train[shown.index]
        (only,) = shown.rows
        assert only.input_ids == row["input_ids"] and only.labels == row["labels"]
        trained_text = "".join(s.text for s in only.segments if s.trained)
        assert trained_text == tiny_tokenizer.decode([x for x in row["labels"] if x != IGNORE_INDEX])

    # Truncated, per example: exactly those longer than max_length before truncation.
    whole = prepare_data(_recipe(tmp_path, tiny_model_dir, copy_data, max_length=128), tiny_tokenizer)
    full_lengths = [len(ids) for ids in whole.train["input_ids"]]
    assert prepared.truncated["train"] == [n > 32 for n in full_lengths]
    assert sum(count for _, _, count in report.histogram) == len(prepared.train)


def test_length_histogram_bins_end_at_max_length() -> None:
    bins = length_histogram([1, 5, 10, 11, 100, 100, 96], 100)
    assert bins[0] == (1, 10, 3) and bins[1] == (11, 20, 1) and bins[-1] == (91, 100, 3)
    assert len(bins) == 10 and sum(n for _, _, n in bins) == 7
    odd = length_histogram([7, 32, 40], 32)  # 32 does not divide into 10 bins; longer examples count as the longest
    assert len(odd) == 10 and odd[0][0] == 1 and odd[-1] == (29, 32, 2) and sum(n for _, _, n in odd) == 3
    assert all(hi + 1 == lo for (_, hi, _), (lo, _, _) in zip(odd, odd[1:], strict=False))


def test_inspect_shows_dropped_counts_and_a_reasoning_example(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok_dir = tmp_path / "reasoning-tokenizer"
    build_reasoning_tokenizer().save_pretrained(tok_dir)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[:2]}]
    data = write_jsonl(tmp_path / "reasoning.jsonl", rows)
    raw = make_recipe(tmp_path, tiny_model_dir, data)
    raw["model"]["tokenizer"] = str(tok_dir)
    raw["data"].update(train={"path": str(data), "format": "chat"}, validation=None, max_length=256)
    recipe = Recipe.model_validate(raw)
    from peftcli.models.load import load_tokenizer

    tok = load_tokenizer(recipe.model)
    report = inspect_split(recipe, tok, prepare_data(recipe, tok), "train", 5, packing=False)
    assert report.stats.examples == 3 and report.stats.dropped_no_labels == 1  # the one ending with a user turn
    assert [e.truncated for e in report.examples] == [False, False]
    first = report.examples[0].rows[0]
    assert [s.text for s in first.segments if s.trained] == [
        "<think>\nafter one comes two\n</think>\n\none two",
        "<|im_end|>",  # special tokens are their own segments, so a terminal can style them
        "\n",
    ]
    assert first.trained_tokens == sum(1 for x in first.labels if x != IGNORE_INDEX) > 5


def test_pairs_show_both_sides_and_a_classifier_its_label(
    tmp_path: Path, tiny_model_dir: Path, tiny_bert_dir: Path
) -> None:
    from peftcli.examples.tiny import marker_classification_task
    from peftcli.models.load import load_tokenizer

    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"copy {w}", "chosen": w, "rejected": "zulu zulu"} for w in ("alpha", "bravo", "echo")],
    )
    raw = make_recipe(tmp_path, tiny_model_dir, pairs, objective={"name": "dpo", "beta": 0.1})
    raw["data"].update(train={"path": str(pairs), "format": "preference"}, validation=None)
    recipe = Recipe.model_validate(raw)
    tok = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe, tok)
    report = inspect_split(recipe, tok, prepared, "train", 1, packing=False)
    (shown,) = report.examples
    chosen, rejected = shown.rows
    assert (chosen.name, rejected.name) == ("chosen", "rejected")
    assert rejected.input_ids == prepared.train[0]["rejected_input_ids"]
    trained = ["".join(s.text for s in row.segments if s.trained) for row in shown.rows]
    assert trained == ["alpha<|im_end|>\n", "zulu zulu<|im_end|>\n"]  # each side's completion, the prompt is context
    assert chosen.trained_tokens > 0 and rejected.trained_tokens > chosen.trained_tokens

    texts = write_jsonl(tmp_path / "labelled.jsonl", marker_classification_task(20))
    raw = make_recipe(tmp_path, tiny_bert_dir, texts, model={"name_or_path": str(tiny_bert_dir), "task": "seq_cls"})
    raw["data"].update(train={"path": str(texts), "format": "classification"}, validation=None)
    recipe = Recipe.model_validate(raw)
    tok = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe, tok)
    report = inspect_split(recipe, tok, prepared, "train", 2, packing=False)
    assert [e.label for e in report.examples] == [prepared.label_names[prepared.train[i]["labels"]] for i in (0, 1)]
    assert [e.rows[0].trained_tokens for e in report.examples] == [0, 0]  # the label is the target, not a token
