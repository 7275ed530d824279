"""model.task against the data formats, data.labels, eval_generation and the method's capabilities."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from peftcli.errors import RecipeError
from peftcli.recipe import schema
from peftcli.recipe.load import load_recipe
from peftcli.tuners.registry import get_tuner

from support import make_recipe, write_recipe


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n')
    return path


def recipe_for(tmp_path: Path, model_dir: Path, data: Path, task: str, fmt: str, **sections) -> dict:
    raw = make_recipe(tmp_path, model_dir, data, **sections)
    raw["model"]["task"] = task
    raw["data"]["train"]["format"] = fmt
    return raw


def only_problem(tmp_path: Path, raw: dict) -> str:
    path = write_recipe(tmp_path / "r.yaml", raw)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("task", "fmt"),
    [
        ("causal_lm", "chat"),
        ("causal_lm", "text"),
        ("seq2seq", "prompt_completion"),
        ("seq2seq", "alpaca"),
        ("seq2seq", "chat"),
        ("seq_cls", "classification"),
        ("token_cls", "token_classification"),
    ],
)
def test_matching_task_and_format_load(tmp_path: Path, model_dir: Path, data_file: Path, task: str, fmt: str) -> None:
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe_for(tmp_path, model_dir, data_file, task, fmt)))
    assert loaded.model.task == task and loaded.data.train.format == fmt


CAUSAL_LM_FORMATS = "chat, alpaca, prompt_completion, text, preference or unpaired_preference"


@pytest.mark.parametrize(
    ("task", "fmt", "wanted"),
    [
        ("seq_cls", "prompt_completion", "classification"),
        ("seq_cls", "token_classification", "classification"),
        ("token_cls", "classification", "token_classification"),
        ("causal_lm", "classification", CAUSAL_LM_FORMATS),
        ("causal_lm", "token_classification", CAUSAL_LM_FORMATS),
        ("seq2seq", "text", "prompt_completion, alpaca or chat"),
        ("seq2seq", "classification", "prompt_completion, alpaca or chat"),
    ],
)
def test_task_needs_its_formats(
    tmp_path: Path, model_dir: Path, data_file: Path, task: str, fmt: str, wanted: str
) -> None:
    line = only_problem(tmp_path, recipe_for(tmp_path, model_dir, data_file, task, fmt))
    assert f": data.train.format: model.task {task} reads format {wanted}, not {fmt}" in line, line


def test_validation_source_format_is_checked_too(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["data"]["validation"] = {"path": str(data_file), "format": "text"}
    line = only_problem(tmp_path, raw)
    assert "data.validation.format" in line and "seq_cls" in line and "classification" in line


def test_seq2seq_refuses_chat_prompt_style(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq2seq", "prompt_completion")
    raw["data"]["train"]["prompt_style"] = "chat"
    line = only_problem(tmp_path, raw)
    assert "data.train.prompt_style" in line and "seq2seq" in line


def test_eval_generation_only_for_generative_tasks(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["training"]["eval_generation"] = {"pattern": r"\d+"}
    line = only_problem(tmp_path, raw)
    assert "training.eval_generation" in line and "seq_cls" in line
    raw = recipe_for(tmp_path, model_dir, data_file, "seq2seq", "prompt_completion")
    raw["training"]["eval_generation"] = {"pattern": r"\d+"}
    assert load_recipe(write_recipe(tmp_path / "ok.yaml", raw)).training.eval_generation is not None


def test_unknown_task_suggests_one(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    line = only_problem(tmp_path, recipe_for(tmp_path, model_dir, data_file, "seq_clss", "classification"))
    assert "model.task" in line and "did you mean 'seq_cls'" in line


# data.labels


def test_labels_fix_names_and_order(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["data"]["labels"] = ["positive", "negative", 3]
    assert load_recipe(write_recipe(tmp_path / "r.yaml", raw)).data.labels == ["positive", "negative", 3]


@pytest.mark.parametrize(
    ("labels", "message"),
    [(["only"], "at least two labels"), (["a", "b", "a"], "labels listed twice: a"), ([1, "1"], "twice: 1")],
)
def test_bad_labels(tmp_path: Path, model_dir: Path, data_file: Path, labels: list, message: str) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["data"]["labels"] = labels
    line = only_problem(tmp_path, raw)
    assert "data.labels" in line and message in line


def test_labels_only_for_classification_tasks(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "causal_lm", "prompt_completion")
    raw["data"]["labels"] = ["a", "b"]
    line = only_problem(tmp_path, raw)
    assert "data.labels" in line and "causal_lm" in line


def test_classification_columns(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["data"]["train"]["columns"] = {"text": "sentence", "label": "sentiment", "text_pair": "hypothesis"}
    assert load_recipe(write_recipe(tmp_path / "r.yaml", raw)).data.train.columns["text_pair"] == "hypothesis"
    raw["data"]["train"]["columns"] = {"prompt": "sentence"}
    line = only_problem(tmp_path, raw)
    assert "prompt" in line and "text, label, text_pair" in line
    raw = recipe_for(tmp_path, model_dir, data_file, "token_cls", "token_classification")
    raw["data"]["train"]["columns"] = {"tokens": "words", "tags": "ner_tags"}
    assert load_recipe(write_recipe(tmp_path / "t.yaml", raw)).data.train.columns == {
        "tokens": "words",
        "tags": "ner_tags",
    }


# the method's capabilities


def _limited_lora(monkeypatch: pytest.MonkeyPatch, **capabilities) -> None:
    real = get_tuner("lora")
    limited = dataclasses.replace(real, capabilities=dataclasses.replace(real.capabilities, **capabilities))
    monkeypatch.setattr(schema, "get_tuner", lambda name: limited if name == "lora" else get_tuner(name))


def test_method_must_support_the_task(
    tmp_path: Path, model_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limited_lora(monkeypatch, task_types=("causal_lm", "seq2seq"))
    line = only_problem(tmp_path, recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification"))
    assert ": model.task: method lora does not support seq_cls; it supports causal_lm, seq2seq" in line, line
    raw = recipe_for(tmp_path, model_dir, data_file, "seq2seq", "prompt_completion")
    assert load_recipe(write_recipe(tmp_path / "ok.yaml", raw)).model.task == "seq2seq"


def test_method_without_activation_checkpointing(
    tmp_path: Path, model_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limited_lora(monkeypatch, activation_checkpointing=False)
    raw = recipe_for(tmp_path, model_dir, data_file, "causal_lm", "prompt_completion")
    raw["training"]["activation_checkpointing"] = True
    line = only_problem(tmp_path, raw)
    assert "training.activation_checkpointing" in line and "lora" in line and "false" in line
    raw["training"]["activation_checkpointing"] = False
    assert load_recipe(write_recipe(tmp_path / "ok.yaml", raw)).training.activation_checkpointing is False


def test_every_registered_method_claims_known_tasks() -> None:
    for spec in schema.all_tuners().values():
        assert spec.capabilities.task_types, spec.name
        assert set(spec.capabilities.task_types) <= set(schema.TASK_FORMATS), spec.name


def test_packing_is_refused_where_it_cannot_work(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["data"]["packing"] = True
    assert "data.packing: packing is for model.task causal_lm, not seq_cls; set it to false" in only_problem(
        tmp_path, raw
    )
    raw = recipe_for(tmp_path, model_dir, data_file, "causal_lm", "text")
    raw["data"]["packing"] = True
    raw["method"] = {"name": "prompt_tuning", "num_virtual_tokens": 4}
    assert "data.packing: method prompt_tuning cannot train on packed rows" in only_problem(tmp_path, raw)
    assert not get_tuner("prompt_tuning").capabilities.packing and get_tuner("lora").capabilities.packing
    raw["data"]["packing"] = "auto"  # auto leaves packing off for such methods
    assert load_recipe(write_recipe(tmp_path / "ok.yaml", raw)).data.packing == "auto"
    raw = recipe_for(tmp_path, model_dir, data_file, "seq_cls", "classification")
    raw["training"]["cross_entropy"] = "chunked"
    assert "training.cross_entropy: chunked is for model.task causal_lm" in only_problem(tmp_path, raw)
