"""`peft data inspect`: marked examples and statistics in a pipe, colour on a terminal, JSON, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.cli import data as data_commands
from peftcli.data.formats import IGNORE_INDEX
from peftcli.data.prepare import prepare_data
from peftcli.recipe.schema import Recipe

from support import make_recipe, run_cli, write_recipe

COLOUR_SWITCHES = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")


@pytest.fixture
def recipe_file(tmp_path: Path, tiny_model_dir: Path, copy_data: Path) -> Path:
    raw = make_recipe(tmp_path, tiny_model_dir, copy_data)
    raw["data"]["max_length"] = 32  # copy-task examples are 25-44 tokens: some are cut
    return write_recipe(tmp_path / "recipe.yaml", raw)


@pytest.fixture
def prepared(recipe_file: Path):
    """The oracle: what prepare_data itself makes of the recipe."""
    import yaml

    from peftcli.models.load import load_tokenizer

    recipe = Recipe.model_validate(yaml.safe_load(recipe_file.read_text()))
    tokenizer = load_tokenizer(recipe.model)
    return tokenizer, prepare_data(recipe, tokenizer)


def _inspect(recipe_file: Path, monkeypatch, capsys, *, colour: bool, as_json: bool = False, split="train") -> str:
    for name in COLOUR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    if colour:
        monkeypatch.setenv("FORCE_COLOR", "1")  # what a terminal gets; rich decides from the environment
    data_commands.inspect(recipe_file, count=2, split=split, overrides=[], as_json=as_json)
    return capsys.readouterr().out


def test_pipe_output_marks_trained_tokens_and_counts_like_prepare_data(
    recipe_file: Path, prepared, monkeypatch, capsys
) -> None:
    tokenizer, data = prepared
    out = _inspect(recipe_file, monkeypatch, capsys, colour=False)
    assert "\x1b[" not in out
    assert out.startswith("legend: [[trained tokens]], the rest is context; ↵ ends a line\n")

    for index in (0, 1):
        row = data.train[index]
        trained = tokenizer.decode([x for x in row["labels"] if x != IGNORE_INDEX])
        assert f"[[{trained.replace(chr(10), '↵' + chr(10))}]]" in out  # one trained run: the completion
        cut = "truncated to max_length" if data.truncated["train"][index] else "not truncated"
        labelled = sum(x != IGNORE_INDEX for x in row["labels"])
        assert f"── example {index} of train: {len(row['input_ids'])} tokens, {labelled} trained, {cut}\n" in out
    assert "── example 2 " not in out

    s = data.stats["train"]
    assert s.truncated > 0 and s.examples == 360
    assert f"\ntrain: 360 examples, {s.dropped_no_labels} dropped (no trained tokens), {s.truncated} truncated " in out
    assert f"\ntokens: {s.tokens:,}, trained {s.label_tokens:,} ({s.label_tokens / s.tokens:.1%})\n" in out
    assert "\nbatches of 4: length-grouped, padding " in out
    bars = out.split("lengths (tokens per example):\n")[1].splitlines()
    assert len(bars) == 10 and bars[-1].endswith("◀ max_length 32") and "#" in out
    assert sum(int(line.split("◀")[0].split()[-1]) for line in bars) == len(data.train)


def test_terminal_output_is_coloured_without_markers(recipe_file: Path, monkeypatch, capsys) -> None:
    out = _inspect(recipe_file, monkeypatch, capsys, colour=True)
    assert "\x1b[32m" in out and "\x1b[2m" in out  # trained green, context dim
    assert "[[" not in out and "]]" not in out
    assert "█" in out and "\ntrain: 360 examples" in out


def test_json_has_the_token_ids_labels_and_figures(recipe_file: Path, prepared, monkeypatch, capsys) -> None:
    _, data = prepared
    report = json.loads(_inspect(recipe_file, monkeypatch, capsys, colour=False, as_json=True, split="validation"))
    assert report["split"] == "validation" and report["batches"] == "in order"
    assert report["stats"]["examples"] == data.stats["validation"].examples == 40
    first = report["examples"][0]["rows"][0]
    assert first["input_ids"] == data.validation[0]["input_ids"] and first["labels"] == data.validation[0]["labels"]
    assert "".join(s["text"] for s in first["segments"]) == prepared[0].decode(first["input_ids"])


def test_bad_recipe_path_and_split_are_one_line_errors(tmp_path: Path, recipe_file: Path) -> None:
    missing = run_cli("data", "inspect", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.yaml" in lines[0]

    bad_split = run_cli("data", "inspect", str(recipe_file), "--split", "test")
    assert bad_split.returncode == 2
    assert bad_split.stderr.strip() == "error: --split: 'test' is not a split; use train or validation"

    none = run_cli("data", "inspect", str(recipe_file), "--split", "validation", "--set", "data.validation=null")
    assert none.returncode == 2 and none.stderr.strip().startswith("error: data.validation: the recipe has no valid")


def test_a_mix_lists_what_each_source_gives(
    tmp_path: Path, tiny_model_dir: Path, copy_data: Path, monkeypatch, capsys
) -> None:
    raw = make_recipe(tmp_path, tiny_model_dir, copy_data)
    raw["data"]["train"] = [
        {"path": str(copy_data), "format": "prompt_completion", "weight": 3},
        {"path": str(copy_data), "format": "text", "columns": {"text": "prompt"}, "weight": 1},
    ]
    path = write_recipe(tmp_path / "mix.yaml", raw)
    from peftcli.models.load import load_tokenizer

    recipe = Recipe.model_validate(raw)
    mix = prepare_data(recipe, load_tokenizer(recipe.model)).stats["train"].mix
    out = _inspect(path, monkeypatch, capsys, colour=False)
    for source in mix:
        assert (
            f"\n  {source['source']}: {source['examples']:,} examples ({source['examples_share']:.1%}), "
            f"{source['label_tokens_share']:.1%} of trained tokens, {source['truncated']} truncated\n"
        ) in out
    assert [s["source"] for s in mix] == ["data.train[0]", "data.train[1]"] and mix[0]["examples"] > mix[1]["examples"]
