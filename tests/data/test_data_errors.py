"""Mistakes in data files: one DataError line that names the file, the line or byte, and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.data import sources
from peftcli.data.sources import load_source
from peftcli.errors import DataError
from peftcli.recipe.schema import DATA_FILE_SUFFIXES, DataSource

from support import make_recipe, run_cli, write_recipe

ROW = {"prompt": "copy a", "completion": "a"}


def load(path: Path, **options):
    return load_source(DataSource(path=str(path), format="prompt_completion", **options), "data.train")


def refused(path: Path, **options) -> str:
    """The one-line message loading `path` raises."""
    with pytest.raises(DataError) as info:
        load(path, **options)
    message = str(info.value)
    assert message.startswith("data.train.path: ") and "\n" not in message, message
    return message


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# malformed JSON


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ('{"prompt": "a", ', "is not valid JSON (Expecting property name"),
        ("just some text", "is not valid JSON (Expecting value at column 1)"),
        ("[1, 2]", "is an array, not a JSON object"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path: Path, bad: str, what: str) -> None:
    good = [json.dumps(ROW)] * 2 + [""]  # a blank line still counts as a line
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([*good, bad, json.dumps(ROW)]) + "\n", encoding="utf-8")
    message = refused(data)
    assert f"{data}: line {len(good) + 1} {what}" in message, message
    assert "fix or remove that line" in message


def test_bad_json_document_names_line_and_column(tmp_path: Path) -> None:
    lines = ["[", json.dumps(ROW) + ",", '{"prompt": "b" "completion": "b"}', "]"]
    data = tmp_path / "train.json"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    column = lines[2].index('"completion"') + 1
    message = refused(data)
    assert f"{data}: not valid JSON at line 3 (Expecting ',' delimiter at column {column})" in message, message


def test_json_lines_in_a_json_file_are_checked_line_by_line(tmp_path: Path) -> None:
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n" + '{"prompt": "x",\n', encoding="utf-8")
    assert f"{data}: line 3 is not valid JSON" in refused(data)


# ragged CSV


def test_csv_row_with_extra_fields_names_its_line_and_counts(tmp_path: Path) -> None:
    rows = ["prompt,completion", '"a quoted value\nover two lines",b', "c,d", "e,f,g", "h,i"]
    text = "\n".join(rows) + "\n"
    data = tmp_path / "train.csv"
    data.write_text(text, encoding="utf-8")
    line = text[: text.index("e,f,g")].count("\n") + 1  # the quoted value spans two lines
    message = refused(data)
    assert f"{data}: line {line} has 3 fields, expected 2 like the header" in message, message


def test_csv_row_with_fewer_fields_loads_with_an_empty_value(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("prompt,completion\na,b\nc\n", encoding="utf-8")
    assert load(data)[1] == {"prompt": "c", "completion": None}


# blank files


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv", "train.txt"])
def test_file_of_blank_lines_is_empty(tmp_path: Path, name: str) -> None:
    data = tmp_path / name
    data.write_text("\n  \n\t\n\n", encoding="utf-8")
    message = refused(data)
    assert f"{data} is empty: it has only blank lines (no examples)" in message, message


# directories


def test_empty_directory_lists_supported_suffixes(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    message = refused(folder)
    assert f"{folder} has no data files (it is empty)" in message, message
    assert all(suffix in message for suffix in DATA_FILE_SUFFIXES)
    (folder / ".hidden.jsonl").write_text(json.dumps(ROW) + "\n")
    assert f"{folder} has no data files (hidden files are not read)" in refused(folder)


def test_directory_without_data_files_names_what_it_holds(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.md").write_text("about the data\n")
    (folder / "rows.tsv").write_text("prompt\tcompletion\na\tb\n")
    message = refused(folder)
    assert f"{folder} has no data files (it holds only notes.md, rows.tsv)" in message, message
    assert all(suffix in message for suffix in DATA_FILE_SUFFIXES)


def test_mixed_format_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "a.jsonl", [ROW])
    (folder / "b.csv").write_text("prompt,completion\na,b\n")
    message = refused(folder)
    assert f"{folder} mixes data formats (.csv: b.csv; .jsonl: a.jsonl)" in message, message
    assert "keep one format per directory, or point data.train.path at one file" in message


def test_json_and_jsonl_are_one_format(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "a.jsonl", [ROW])
    (folder / "b.json").write_text(json.dumps([ROW, ROW]))
    assert len(load(folder)) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_directory_files_with_different_columns_are_refused(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    folder = tmp_path / "data"
    folder.mkdir()
    frames = {"a": pd.DataFrame([ROW]), "b": pd.DataFrame([{"text": "copy a a"}])}
    for name, frame in frames.items():
        target = folder / f"{name}{suffix}"
        if suffix == ".jsonl":
            frame.to_json(target, orient="records", lines=True)
        elif suffix == ".csv":
            frame.to_csv(target, index=False)
        else:
            frame.to_parquet(target)
    message = refused(folder)
    expected = f"{folder}: a{suffix} has columns completion, prompt but b{suffix} has text"
    assert expected in message, message


def test_directory_loads_its_files_in_order_with_subfolders_and_without_hidden_files(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "b.jsonl", [{"prompt": "b", "completion": "b"}])
    jsonl(folder / "a.jsonl", [{"prompt": "a", "completion": "a"}])
    jsonl(folder / "more" / "c.jsonl", [{"prompt": "c", "completion": "c"}])
    jsonl(folder / ".draft.jsonl", [{"prompt": "hidden", "completion": "x"}])
    jsonl(folder / ".cache" / "d.jsonl", [{"prompt": "hidden", "completion": "x"}])
    assert load(folder)["prompt"] == ["a", "b", "c"]


def test_directory_files_named_for_splits_are_read_by_split(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "train.jsonl", [ROW] * 3)
    jsonl(folder / "validation.jsonl", [ROW] * 2)
    assert len(load(folder)) == 3 and len(load(folder, split="validation")) == 2
    message = refused(folder, split="test")
    assert f"{folder} has no data files for split 'test' (its files make split(s) train, validation)" in message


def test_bad_line_in_a_directory_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "a.jsonl", [ROW])
    bad = folder / "b.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{oops\n")
    assert f"cannot read {bad}: line 2 is not valid JSON" in refused(folder)


def test_datasets_saved_to_disk_still_load(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list([ROW] * 3)).save_to_disk(str(folder))
    assert len(load(folder)) == 3


def test_hub_style_directory_keeps_its_card_configuration(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    jsonl(folder / "rows" / "part.jsonl", [ROW] * 4)
    (folder / "notes.csv").write_text("unrelated,file\n1,2\n")  # not named by the card, so not read
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: rows/*.jsonl\n---\n"
    (folder / "README.md").write_text(card)
    assert len(load(folder)) == 4


# encoding


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        ("train.jsonl", json.dumps(ROW) + '\n{"prompt": "caf', '", "completion": "b"}\n'),
        ("train.csv", "prompt,completion\na,b\ncaf", ",b\n"),
    ],
)
def test_non_utf8_byte_is_named_with_offset_and_line(tmp_path: Path, name: str, before: str, after: str) -> None:
    data = tmp_path / name
    data.write_bytes(before.encode() + "é".encode("latin-1") + after.encode())  # latin-1 é is the byte 0xe9
    message = refused(data)
    expected = f"{data} is not UTF-8 (byte 0xe9 at offset {len(before)}, line {before.count(chr(10)) + 1})"
    assert expected in message, message
    assert message.endswith("re-save it as UTF-8")


def test_utf8_check_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK", 5)  # two-, three- and four-byte characters land across chunks
    good = "".join(
        json.dumps({"prompt": f"é{i} ü 語 🙂", "completion": "ok"}, ensure_ascii=False) + "\n" for i in range(9)
    )
    data = tmp_path / "train.jsonl"
    data.write_text(good, encoding="utf-8")
    assert len(load(data)) == 9
    for tail in (b"\xff", b"\xe8\xaa"):  # a byte never in UTF-8; a character cut short at the end of the file
        data.write_bytes(good.encode() + tail)
        offset = len(good.encode())
        assert f"at offset {offset}, line {good.count(chr(10)) + 1})" in refused(data)


def test_parquet_is_not_checked_as_text(tmp_path: Path) -> None:
    import pandas as pd

    data = tmp_path / "rows.parquet"
    pd.DataFrame([ROW] * 2).to_parquet(data)
    assert len(load(data)) == 2


# the command line


def test_train_on_mixed_format_directory_is_one_error_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "data"
    jsonl(folder / "a.jsonl", [ROW] * 8)
    (folder / "b.csv").write_text("prompt,completion\na,b\n")
    recipe = make_recipe(tmp_path, tiny_model_dir, folder)
    result = run_cli("train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{folder} mixes data formats" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(recipe["output"]["dir"]).exists()
