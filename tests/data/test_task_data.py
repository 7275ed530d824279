"""Data for seq_cls, token_cls and seq2seq: token ids, label ids and alignment, label order, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftcli.data.collate import PadCollator
from peftcli.data.formats import IGNORE_INDEX, Renderer, sorted_label_names
from peftcli.data.prepare import prepare_data
from peftcli.errors import DataError
from peftcli.recipe.schema import DataSource, Recipe

from support import make_recipe

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "is", "good", "bad", "not", "char", "##lie"]
WORDS += ["##x", "alpha", "bravo", "un", "##believ", "##able", "paris", "berlin", "in", "lives", "ann"]


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A real BERT WordPiece tokenizer ([CLS] ... [SEP], token_type_ids, ## sub-words) over a small vocabulary."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)})


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_model_dir: Path):
    """The tiny byte-level BPE tokenizer: no special tokens around a text, eos <|im_end|>."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(tmp_path: Path, data: Path, task: str, fmt: str, validation=None, **data_section) -> Recipe:
    raw = make_recipe(tmp_path, tmp_path, data)
    raw["model"]["task"] = task
    raw["data"]["train"]["format"] = fmt
    raw["data"]["validation"] = validation
    raw["data"].update(data_section)
    return Recipe.model_validate(raw)


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# seq_cls


def test_seq_cls_examples_have_special_tokens_and_one_label(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(
        tmp_path / "cls.jsonl",
        [{"text": "the movie is good", "label": "pos"}, {"text": "the movie is bad", "label": "neg"}],
    )
    prepared = prepare_data(recipe(tmp_path, data, "seq_cls", "classification"), bert_tokenizer)
    assert prepared.label_names == ["neg", "pos"]  # sorted
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    first, second = prepared.train[0], prepared.train[1]
    assert first["input_ids"] == [cls, *ids(bert_tokenizer, "the movie is good"), sep]
    assert first["labels"] == 1 and second["labels"] == 0
    assert first["token_type_ids"] == [0] * len(first["input_ids"])
    assert prepared.stats["train"].label_counts == {"neg": 1, "pos": 1}
    assert prepared.stats["train"].label_tokens == 2


def test_seq_cls_pairs_and_column_mapping(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(tmp_path / "pairs.jsonl", [{"premise": "the movie is good", "claim": "not bad", "gold": 1}] * 2)
    raw = recipe(tmp_path, data, "seq_cls", "classification", labels=[0, 1])
    raw.data.train.columns.update(text="premise", text_pair="claim", label="gold")
    example = prepare_data(raw, bert_tokenizer).train[0]
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    a, b = ids(bert_tokenizer, "the movie is good"), ids(bert_tokenizer, "not bad")
    assert example["input_ids"] == [cls, *a, sep, *b, sep]
    assert example["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert example["labels"] == 1


def test_seq_cls_truncation_keeps_the_closing_special_token(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(
        tmp_path / "long.jsonl", [{"text": "the movie " * 20, "label": "a"}, {"text": "good", "label": "b"}]
    )
    prepared = prepare_data(recipe(tmp_path, data, "seq_cls", "classification", max_length=10), bert_tokenizer)
    long = prepared.train[0]["input_ids"]
    assert len(long) == 10 and long[0] == bert_tokenizer.cls_token_id and long[-1] == bert_tokenizer.sep_token_id
    assert prepared.stats["train"].truncated == 1


def test_label_order(tmp_path: Path, bert_tokenizer) -> None:
    numbers = write_rows(tmp_path / "n.jsonl", [{"text": "good", "label": n} for n in (10, 2, 1, 2)])
    prepared = prepare_data(recipe(tmp_path, numbers, "seq_cls", "classification"), bert_tokenizer)
    assert prepared.label_names == ["1", "2", "10"]  # numerically, not as text
    assert prepared.train["labels"] == [2, 1, 0, 1]

    words = write_rows(tmp_path / "w.jsonl", [{"text": "good", "label": w} for w in ("pos", "neg", "neu")])
    fixed = recipe(tmp_path, words, "seq_cls", "classification", labels=["neg", "neu", "pos"][::-1])
    prepared = prepare_data(fixed, bert_tokenizer)
    assert prepared.label_names == ["pos", "neu", "neg"]  # data.labels fixes ids
    assert prepared.train["labels"] == [0, 2, 1]
    assert sorted_label_names(["b", "a", "c", "a"]) == ["a", "b", "c"]
    assert sorted_label_names([3.0, 1, -2]) == ["-2", "1", "3"]


def test_unknown_validation_label_names_file_and_label(tmp_path: Path, bert_tokenizer) -> None:
    train = write_rows(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    held = write_rows(tmp_path / "eval.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "meh"}])
    validation = {"path": str(held), "format": "classification"}
    with pytest.raises(DataError) as info:
        prepare_data(recipe(tmp_path, train, "seq_cls", "classification", validation=validation), bert_tokenizer)
    message = str(info.value)
    assert message.startswith(f"data.validation: {held}: example 1: label 'meh'"), message
    assert "neg, pos" in message and "data.train" in message and "data.labels" in message


def test_unknown_train_label_with_fixed_labels(tmp_path: Path, bert_tokenizer) -> None:
    train = write_rows(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    with pytest.raises(DataError, match=r"data\.train: .*train\.jsonl: example 1: label 'neg'.*from data\.labels"):
        prepare_data(recipe(tmp_path, train, "seq_cls", "classification", labels=["pos", "neu"]), bert_tokenizer)


def test_held_out_share_uses_the_labels_of_all_train_rows(tmp_path: Path, bert_tokenizer) -> None:
    # 'rare' appears once: whichever side of the split it lands on, it has an id.
    rows = [{"text": "good", "label": "common"}] * 9 + [{"text": "bad", "label": "rare"}]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    prepared = prepare_data(
        recipe(tmp_path, data, "seq_cls", "classification", validation={"fraction": 0.1}), bert_tokenizer
    )
    assert prepared.label_names == ["common", "rare"]
    assert len(prepared.train) == 9 and len(prepared.validation) == 1


def test_one_label_is_not_a_classifier(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(tmp_path / "one.jsonl", [{"text": "good", "label": "pos"}] * 3)
    with pytest.raises(DataError, match="at least two labels"):
        prepare_data(recipe(tmp_path, data, "seq_cls", "classification"), bert_tokenizer)


def test_missing_label_column_is_named(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(tmp_path / "x.jsonl", [{"text": "good", "sentiment": "pos"}])
    with pytest.raises(DataError, match=r"needs column\(s\) label.*columns"):
        prepare_data(recipe(tmp_path, data, "seq_cls", "classification"), bert_tokenizer)


# token_cls


def expected_alignment(tokenizer, words: list[str], tags: list[int], special: bool) -> tuple[list[int], list[int]]:
    """Word by word: the word's sub-tokens, its tag on the first and -100 on the rest; specials get -100."""
    input_ids, labels = [], []
    for word, tag in zip(words, tags, strict=True):
        pieces = ids(tokenizer, word)
        input_ids += pieces
        labels += [tag] + [IGNORE_INDEX] * (len(pieces) - 1)
    if special:
        input_ids = [tokenizer.cls_token_id, *input_ids, tokenizer.sep_token_id]
        labels = [IGNORE_INDEX, *labels, IGNORE_INDEX]
    return input_ids, labels


@pytest.mark.parametrize("which", ["bert_tokenizer", "bpe_tokenizer"])
def test_token_cls_labels_the_first_sub_token_of_each_word(tmp_path: Path, which: str, request) -> None:
    tokenizer = request.getfixturevalue(which)
    words = ["ann", "lives", "in", "charliex", "unbelievable", "berlin"]
    tags = ["B-PER", "O", "O", "B-LOC", "O", "B-LOC"]
    data = write_rows(
        tmp_path / "ner.jsonl", [{"tokens": words, "tags": tags}, {"tokens": ["paris"], "tags": ["I-LOC"]}]
    )
    prepared = prepare_data(recipe(tmp_path, data, "token_cls", "token_classification"), tokenizer)
    assert prepared.label_names == ["B-LOC", "B-PER", "I-LOC", "O"]
    tag_ids = [prepared.label_names.index(t) for t in tags]
    expected_ids, expected_labels = expected_alignment(tokenizer, words, tag_ids, special=which == "bert_tokenizer")
    example = prepared.train[0]
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == len(words)
    assert len(expected_ids) > len(words) + 1  # some words really are split into several tokens
    assert prepared.stats["train"].label_counts == {"B-LOC": 2, "B-PER": 1, "I-LOC": 1, "O": 3}


def test_token_cls_truncation_and_mapped_columns(tmp_path: Path, bert_tokenizer) -> None:
    words = ["charliex"] * 10
    data = write_rows(tmp_path / "ner.jsonl", [{"words": words, "ner": [1, 0] * 5}])
    raw = recipe(tmp_path, data, "token_cls", "token_classification", max_length=9)
    raw.data.train.columns.update(tokens="words", tags="ner")
    prepared = prepare_data(raw, bert_tokenizer)
    example = prepared.train[0]
    # [CLS] + 7 sub-tokens + [SEP]: words 0 and 1 whole (3 pieces each), the first piece of word 2
    assert len(example["input_ids"]) == 9 and example["input_ids"][-1] == bert_tokenizer.sep_token_id
    assert example["labels"] == [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX, 1, -100]
    assert prepared.stats["train"].truncated == 1


def test_token_cls_tag_count_must_match(tmp_path: Path, bert_tokenizer) -> None:
    data = write_rows(
        tmp_path / "ner.jsonl",
        [{"tokens": ["ann", "lives"], "tags": ["a", "b"]}, {"tokens": ["ann"], "tags": ["a", "b"]}],
    )
    with pytest.raises(
        DataError, match=r"example 1: column tags should hold one label per word \(1 words, got 2 tags\)"
    ):
        prepare_data(recipe(tmp_path, data, "token_cls", "token_classification"), bert_tokenizer)


# seq2seq


def seq2seq_renderer(tokenizer, data: Path, fmt: str, **options) -> Renderer:
    return Renderer(DataSource(path=str(data), format=fmt, **options), tokenizer, True, "data.train", task="seq2seq")


def test_seq2seq_prompt_is_encoder_input_and_completion_ends_with_eos(tmp_path: Path, bpe_tokenizer) -> None:
    eos = bpe_tokenizer.eos_token_id
    data = write_rows(tmp_path / "pc.jsonl", [{"prompt": "copy alpha bravo", "completion": "alpha bravo"}] * 4)
    prepared = prepare_data(recipe(tmp_path, data, "seq2seq", "prompt_completion"), bpe_tokenizer)
    example = prepared.train[0]
    assert example["input_ids"] == ids(bpe_tokenizer, "copy alpha bravo")  # plain text, no chat template
    assert example["labels"] == [*ids(bpe_tokenizer, "alpha bravo"), eos]
    assert example["labels"][-1] == eos
    assert prepared.label_names is None
    assert prepared.stats["train"].label_tokens == 4 * len(example["labels"])


def test_seq2seq_truncates_inputs_and_targets(tmp_path: Path, bpe_tokenizer) -> None:
    data = write_rows(tmp_path / "pc.jsonl", [{"prompt": "copy " + "alpha " * 30, "completion": "bravo " * 30}])
    example = prepare_data(recipe(tmp_path, data, "seq2seq", "prompt_completion", max_length=12), bpe_tokenizer).train[
        0
    ]
    assert len(example["input_ids"]) == 12 and len(example["labels"]) == 12
    assert example["labels"] == ids(bpe_tokenizer, "bravo " * 30)[:12]


def test_seq2seq_alpaca_and_chat(tmp_path: Path, bpe_tokenizer) -> None:
    eos = bpe_tokenizer.eos_token_id
    alpaca = seq2seq_renderer(bpe_tokenizer, tmp_path, "alpaca")
    example = alpaca({"instruction": "copy the words", "input": "alpha bravo", "output": "alpha bravo"}, 0)
    assert bpe_tokenizer.decode(example["input_ids"]) == "copy the words\n\nalpha bravo"
    assert example["labels"] == [*ids(bpe_tokenizer, "alpha bravo"), eos]
    assert bpe_tokenizer.decode(alpaca({"instruction": "say one", "output": "one"}, 0)["input_ids"]) == "say one"

    chat = seq2seq_renderer(bpe_tokenizer, tmp_path, "chat", system_prompt="be brief")
    single = chat(
        {"messages": [{"role": "user", "content": "copy alpha"}, {"role": "assistant", "content": "alpha"}]}, 0
    )
    assert bpe_tokenizer.decode(single["input_ids"]) == "be brief\n\ncopy alpha"
    assert single["labels"] == [*ids(bpe_tokenizer, "alpha"), eos]
    turns = [
        {"role": "user", "content": "copy alpha"},
        {"role": "assistant", "content": "alpha"},
        {"role": "user", "content": "count one"},
        {"role": "assistant", "content": "one two"},
    ]
    several = chat({"messages": turns}, 0)
    text = bpe_tokenizer.decode(several["input_ids"])
    assert text == "be brief\n\nuser: copy alpha\n\nassistant: alpha\n\nuser: count one"
    assert several["labels"] == [*ids(bpe_tokenizer, "one two"), eos]  # the last assistant turn is the target


# batching


def test_collator_seq_cls_labels_are_one_per_example() -> None:
    examples = [
        {"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": 2},
        {"input_ids": [2, 5, 6, 7, 3], "token_type_ids": [0, 0, 0, 1, 1], "labels": 0},
    ]
    batch = PadCollator(pad_token_id=0)(examples)
    assert batch["labels"].tolist() == [2, 0] and batch["labels"].dtype == torch.long and batch["labels"].dim() == 1
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_collator_seq2seq_pads_targets_to_their_own_length() -> None:
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [9, 1]}, {"input_ids": [5], "labels": [9, 9, 9, 1, 1, 1]}]
    batch = PadCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[9, 1] + [IGNORE_INDEX] * 6, [9, 9, 9, 1, 1, 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert "token_type_ids" not in batch


def test_prepared_batches_fit_the_collator(tmp_path: Path, bert_tokenizer) -> None:
    rows = [{"tokens": ["ann"] * n, "tags": (["a", "b"] * n)[:n]} for n in (2, 6)]
    data = write_rows(tmp_path / "ner.jsonl", rows)
    prepared = prepare_data(recipe(tmp_path, data, "token_cls", "token_classification"), bert_tokenizer)
    batch = PadCollator(bert_tokenizer.pad_token_id)([prepared.train[0], prepared.train[1]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX] * 4
