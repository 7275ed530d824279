"""Data formats rendered into token ids and labels, sources, preparation checks and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftcli.data.collate import PadCollator
from peftcli.data.formats import IGNORE_INDEX, Renderer, truncate
from peftcli.data.prepare import prepare_data
from peftcli.data.sources import load_source
from peftcli.errors import DataError
from peftcli.recipe.schema import DataSource, Recipe

from support import make_recipe

CONVERSATION = [
    {"role": "system", "content": "you answer in words"},
    {"role": "user", "content": "copy alpha bravo"},
    {"role": "assistant", "content": "alpha bravo"},
    {"role": "user", "content": "count one two"},
    {"role": "assistant", "content": "one two three"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    return tok


def renderer(tokenizer, data: Path, fmt: str, mask_prompt: bool = True, **options) -> Renderer:
    return Renderer(DataSource(path=str(data), format=fmt, **options), tokenizer, mask_prompt, "data.train")


def ids_of(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def labelled(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def labelled_runs(example: dict) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions."""
    runs: list[list[int]] = []
    previous = False
    for label in example["labels"]:
        inside = label != IGNORE_INDEX
        if inside and not previous:
            runs.append([])
        if inside:
            runs[-1].append(label)
        previous = inside
    return runs


def assert_labels_are_ids_or_masked(example: dict) -> None:
    assert len(example["labels"]) == len(example["input_ids"])
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        assert label in (token, IGNORE_INDEX)


# chat


def test_chat_masks_everything_but_assistant_turns(tokenizer, copy_data: Path) -> None:
    example = renderer(tokenizer, copy_data, "chat")({"messages": CONVERSATION}, 0)

    # Expected, built independently: the template's pieces tokenized one by one. The header of every turn and
    # every non-assistant turn is masked; an assistant turn's content and its closing '<|im_end|>\n' are labelled.
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for message in CONVERSATION:
        header = ids_of(tokenizer, f"<|im_start|>{message['role']}\n")
        body = ids_of(tokenizer, f"{message['content']}<|im_end|>\n")
        expected_ids += header + body
        expected_labels += [IGNORE_INDEX] * len(header)
        expected_labels += body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body)

    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == ids_of(tokenizer, text)
    assert example["input_ids"] == expected_ids  # the pieces tokenize exactly as the whole
    assert example["labels"] == expected_labels

    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = example["input_ids"], example["labels"]
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == im_start)
    end_labels = [labels[i] for i, t in enumerate(ids) if t == im_end]
    assert end_labels == [IGNORE_INDEX, IGNORE_INDEX, im_end, IGNORE_INDEX, im_end]  # system, user, asst, user, asst

    runs = labelled_runs(example)
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    assert decoded == ["alpha bravo<|im_end|>\n", "one two three<|im_end|>\n"]
    masked_text = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    for hidden in ("you answer in words", "copy alpha bravo", "count one two", "assistant", "user", "system"):
        assert hidden in masked_text


def test_chat_without_mask_prompt_labels_everything(tokenizer, copy_data: Path) -> None:
    example = renderer(tokenizer, copy_data, "chat", mask_prompt=False)({"messages": CONVERSATION}, 0)
    assert example["labels"] == example["input_ids"]
    assert len(example["input_ids"]) > 20


def test_chat_system_prompt_is_added_and_masked(tokenizer, copy_data: Path) -> None:
    render = renderer(tokenizer, copy_data, "chat", system_prompt="be brief")
    example = render({"messages": CONVERSATION[1:3]}, 0)
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["alpha bravo<|im_end|>\n"]


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        ("alpaca", {"instruction": "copy alpha", "output": "alpha"}),
        ("prompt_completion", {"prompt": "copy alpha", "completion": "alpha"}),
    ],
)
def test_system_prompt_comes_first_in_chat_rendered_pairs(tokenizer, copy_data: Path, fmt, row) -> None:
    example = renderer(tokenizer, copy_data, fmt, system_prompt="be brief")(row, 0)
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["alpha<|im_end|>\n"]


def test_chat_bad_messages_are_data_errors(tokenizer, copy_data: Path) -> None:
    render = renderer(tokenizer, copy_data, "chat")
    with pytest.raises(DataError, match="example 3"):
        render({"messages": []}, 3)
    with pytest.raises(DataError, match="message 1"):
        render({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, 0)


# alpaca


def test_alpaca_chat_style(tokenizer, copy_data: Path) -> None:
    row = {"instruction": "copy the words", "input": "alpha bravo", "output": "alpha bravo"}
    example = renderer(tokenizer, copy_data, "alpaca")(row, 0)  # auto: the tokenizer has a template
    assert_labels_are_ids_or_masked(example)
    text = tokenizer.decode(example["input_ids"])
    assert text == (
        "<|im_start|>user\ncopy the words\n\nalpha bravo<|im_end|>\n<|im_start|>assistant\nalpha bravo<|im_end|>\n"
    )
    runs = labelled_runs(example)
    assert len(runs) == 1
    assert tokenizer.decode(runs[0]) == "alpha bravo<|im_end|>\n"
    first = example["labels"].index(runs[0][0])
    prompt = ids_of(tokenizer, "<|im_start|>user\ncopy the words\n\nalpha bravo<|im_end|>\n<|im_start|>assistant\n")
    assert example["input_ids"][:first] == prompt
    assert example["labels"][:first] == [IGNORE_INDEX] * len(prompt)
    assert example["labels"][first:] == example["input_ids"][first:]


def test_alpaca_plain_style(tokenizer, copy_data: Path) -> None:
    row = {"instruction": "copy the words", "input": "alpha bravo", "output": "alpha bravo"}
    example = renderer(tokenizer, copy_data, "alpaca", prompt_style="plain")(row, 0)
    assert_labels_are_ids_or_masked(example)
    output_ids = ids_of(tokenizer, "alpha bravo") + [tokenizer.eos_token_id]
    n = len(output_ids)
    assert example["input_ids"][-n:] == output_ids
    assert example["labels"][-n:] == output_ids
    assert example["labels"][:-n] == [IGNORE_INDEX] * (len(example["labels"]) - n)
    assert tokenizer.decode(labelled(example)) == "alpha bravo<|im_end|>"
    prompt = tokenizer.decode(example["input_ids"][:-n])
    assert "<|im_start|>" not in prompt  # no chat template
    assert "### Instruction:\ncopy the words\n\n### Input:\nalpha bravo\n\n### Response:\n" in prompt
    assert "paired with an input" in prompt

    without_input = renderer(tokenizer, copy_data, "alpaca", prompt_style="plain")(
        {"instruction": "say one", "output": "one"}, 0
    )
    prompt = tokenizer.decode(without_input["input_ids"])
    assert "### Input:" not in prompt and "paired with an input" not in prompt
    assert tokenizer.decode(labelled(without_input)) == "one<|im_end|>"


def test_plain_style_without_mask_prompt(tokenizer, copy_data: Path) -> None:
    row = {"prompt": "copy alpha", "completion": "alpha"}
    example = renderer(tokenizer, copy_data, "prompt_completion", mask_prompt=False, prompt_style="plain")(row, 0)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


# prompt_completion


def test_prompt_completion_with_column_mapping(tokenizer, copy_data: Path) -> None:
    render = renderer(tokenizer, copy_data, "prompt_completion", columns={"prompt": "question", "completion": "answer"})
    assert render.required_columns() == ["question", "answer"]
    render.check_columns(["question", "answer", "id"])
    example = render({"question": "copy kilo lima", "answer": "kilo lima", "id": 7}, 0)
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>user\ncopy kilo lima<|im_end|>")
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["kilo lima<|im_end|>\n"]


def test_missing_column_names_it_and_the_available_ones(tokenizer, copy_data: Path) -> None:
    render = renderer(tokenizer, copy_data, "prompt_completion", columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(DataError) as info:
        render.check_columns(["question", "reply"])
    message = str(info.value)
    assert "data.train" in message
    assert "answer" in message  # the missing one
    assert "question, reply" in message  # what the data has
    assert "columns" in message  # how to map them

    with pytest.raises(DataError, match="needs column"):
        renderer(tokenizer, copy_data, "prompt_completion").check_columns(["text"])


def test_non_text_value_is_a_data_error(tokenizer, copy_data: Path) -> None:
    with pytest.raises(DataError, match=r"example 5: column completion should hold text, got int"):
        renderer(tokenizer, copy_data, "prompt_completion")({"prompt": "a", "completion": 3}, 5)


# text


def test_text_labels_everything_and_ends_with_eos(tokenizer, copy_data: Path) -> None:
    example = renderer(tokenizer, copy_data, "text")({"text": "alpha bravo charlie"}, 0)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"]) == "alpha bravo charlie<|im_end|>"


# truncation and preparation


def test_truncate() -> None:
    example = {"input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 5 + list(range(5, 10))}
    cut = truncate(example, 7)
    assert cut == {"input_ids": list(range(7)), "labels": [IGNORE_INDEX] * 5 + [5, 6], "truncated": True}
    assert truncate(example, 10)["truncated"] is False
    assert truncate(example, 10)["input_ids"] == list(range(10))


def _recipe(tmp_path: Path, model_dir: Path, data: Path, max_length: int = 64, **train) -> Recipe:
    raw = make_recipe(tmp_path, model_dir, data)
    raw["data"]["max_length"] = max_length
    raw["data"]["train"].update(train)
    return Recipe.model_validate(raw)


def test_prepare_data_splits_and_truncates(tmp_path: Path, tiny_model_dir: Path, copy_data: Path, tokenizer) -> None:
    # copy-task examples render to 25-44 chat tokens, their prompts to 21-30
    prepared = prepare_data(_recipe(tmp_path, tiny_model_dir, copy_data, max_length=32), tokenizer)
    assert len(prepared.train) == 360 and len(prepared.validation) == 40
    assert set(prepared.train.column_names) == {"input_ids", "labels"}
    assert max(len(ids) for ids in prepared.train["input_ids"]) <= 32
    stats = prepared.stats["train"]
    assert stats.examples == 360 and stats.truncated > 0 and stats.dropped_no_labels == 0
    assert stats.tokens == sum(len(ids) for ids in prepared.train["input_ids"])
    assert stats.label_tokens == sum(sum(x != IGNORE_INDEX for x in labels) for labels in prepared.train["labels"])


def test_prepare_data_drops_examples_without_labels(
    tmp_path: Path, tiny_model_dir: Path, copy_data: Path, tokenizer
) -> None:
    prepared = prepare_data(_recipe(tmp_path, tiny_model_dir, copy_data, max_length=26), tokenizer)
    stats = prepared.stats["train"]
    assert stats.examples == 360 and 0 < stats.dropped_no_labels < 360
    assert len(prepared.train) == 360 - stats.dropped_no_labels
    assert all(any(x != IGNORE_INDEX for x in labels) for labels in prepared.train["labels"])


def test_prepare_data_refuses_when_every_label_is_cut_away(
    tmp_path: Path, tiny_model_dir: Path, copy_data: Path, tokenizer
) -> None:
    # The chat prompt ('<|im_start|>user\ncopy w1 w2<|im_end|>\n<|im_start|>assistant\n') is longer than 9 tokens.
    with pytest.raises(DataError, match="masked") as info:
        prepare_data(_recipe(tmp_path, tiny_model_dir, copy_data, max_length=9), tokenizer)
    assert "data.train" in str(info.value) and "max_length" in str(info.value)


def test_prepare_data_missing_columns(tmp_path: Path, tiny_model_dir: Path, copy_data: Path, tokenizer) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match="prompt, completion"):
        prepare_data(_recipe(tmp_path, tiny_model_dir, data), tokenizer)
    mapped = _recipe(tmp_path, tiny_model_dir, data, columns={"prompt": "question", "completion": "answer"})
    assert len(prepare_data(mapped, tokenizer).train) == 9


# sources


def test_empty_jsonl_is_a_data_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty") as info:
        load_source(DataSource(path=str(empty), format="prompt_completion"), "data.train")
    assert "data.train.path" in str(info.value) and str(empty) in str(info.value)


def test_csv_and_parquet_sources(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["copy a", "copy b", "copy c"], "completion": ["a", "b", "c"]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        dataset = load_source(DataSource(path=str(tmp_path / name), format="prompt_completion"), "data.train")
        assert dataset.column_names == ["prompt", "completion"], name
        assert len(dataset) == 3 and dataset[1] == {"prompt": "copy b", "completion": "b"}, name
    limited = load_source(
        DataSource(path=str(tmp_path / "rows.csv"), format="prompt_completion", max_samples=2), "data.train"
    )
    assert len(limited) == 2


def test_unreadable_source_is_a_data_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError, match="cannot read"):
        load_source(DataSource(path=str(broken), format="prompt_completion"), "data.train")


# batching


def test_pad_collator_pads_by_length_and_keeps_pad_equal_tokens_labelled() -> None:
    pad = 3
    examples = [
        {"input_ids": [5, 6, 7, pad], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, pad]},  # a real last token == pad
        {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]},
    ]
    batch = PadCollator(pad_token_id=pad)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [8, 9, pad, pad]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, pad],
        [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_collator_pad_to_multiple_of(tokenizer) -> None:
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    examples = [{"input_ids": [10, 11, eos], "labels": [IGNORE_INDEX, 11, eos]}]
    batch = PadCollator(pad_token_id=pad, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, eos] + [IGNORE_INDEX] * 5]
    assert batch["attention_mask"].sum().item() == 3
