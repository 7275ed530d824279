"""The tokenized-data cache (peftcli/data/cache.py) and `peft data prepare`: prepared once, then read by training
without tokenizing; a key that follows the data's content, max_length and the chat template; entries that are
whole or not used; tokenization progress as plain lines."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from peftcli.data import cache
from peftcli.data.cache import cache_key, remove_dead_staging, tokenized_data
from peftcli.data.prepare import prepare_data
from peftcli.data.progress_lines import ProgressLines
from peftcli.errors import OutputError
from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.models.load import load_tokenizer
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import SilentReporter, train
from peftcli.train.reference_logps import fingerprint
from peftcli.train.run_dir import leftovers_under
from peftcli.writers import WRITER_FILE

from support import make_recipe, run_cli, write_recipe


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache for this test alone."""
    root = tmp_path / "tokenized"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "copy.jsonl", copy_task(48))


def _recipe(tmp_path, tiny_model_dir, data_file, **data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data_file, training={"max_steps": 2, "batch_size": 4})
    recipe["data"].update(data)
    return validate_recipe_dict(recipe, "r.yaml")


def _no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the data")

    monkeypatch.setattr(cache, "prepare_data", refuse)


def _entry(root):
    (entry,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return entry


class Messages(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_prepare_then_train_reads_the_cache_without_tokenizing(
    tmp_path, tiny_model_dir, data_file, own_cache, monkeypatch, one_torch_thread
):
    recipe_dict = make_recipe(tmp_path, tiny_model_dir, data_file, training={"max_steps": 2, "batch_size": 4})
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe_dict)
    result = run_cli("data", "prepare", str(recipe_file))
    assert result.returncode == 0, result.stderr
    entry = _entry(own_cache)
    # Not a terminal: one plain line per split when it is done, then what was written.
    assert "tokenized data.train: 43 examples in " in result.stderr
    assert "tokenized data.validation: 5 examples in " in result.stderr
    assert f"tokenized data written to {entry} (" in result.stdout
    assert "  train: 43 examples, " in result.stdout and " truncated to max_length 64, " in result.stdout

    again = run_cli("data", "prepare", str(recipe_file))
    assert again.returncode == 0, again.stderr
    assert f"already cached, nothing tokenized: {entry} (" in again.stdout
    assert "tokenizing" not in again.stderr and "tokenized data." not in again.stderr

    recipe = validate_recipe_dict(recipe_dict, "r.yaml")
    tokenizer = load_tokenizer(recipe.model)
    fresh = prepare_data(recipe, tokenizer)
    _no_tokenizing(monkeypatch)
    cached, found = tokenized_data(recipe, tokenizer)
    assert found.reused and found.path == entry
    # What the precomputed reference table is keyed by: the tokenized values, equal to a fresh tokenization.
    assert fingerprint([cached.train, cached.validation]) == fingerprint([fresh.train, fresh.validation])
    assert cached.stats == fresh.stats and cached.label_names == fresh.label_names
    assert cached.train[:] == fresh.train[:]

    messages = Messages()
    summary = train(recipe, reporter=messages)
    assert summary["steps"] == 2
    assert f"tokenized data: from cache {entry}" in messages.lines


def test_train_fills_the_cache_and_reports_its_progress(
    tmp_path, tiny_model_dir, data_file, own_cache, one_torch_thread
):
    recipe = _recipe(tmp_path, tiny_model_dir, data_file)
    messages = Messages()
    train(recipe, reporter=messages)
    entry = _entry(own_cache)
    # Through the reporter, as plain lines (datasets' own bars stay off): the tiny splits each take under the
    # 10 s between interim lines, so each shows its closing line.
    assert any(line.startswith("tokenized data.train: 43 examples in ") for line in messages.lines)
    assert any(line.startswith("tokenized data.validation: 5 examples in ") for line in messages.lines)
    assert any(line.startswith(f"tokenized data: written to cache {entry} (") for line in messages.lines)
    _, found = tokenized_data(recipe, load_tokenizer(recipe.model))
    assert found.reused and found.path == entry


def test_the_key_follows_the_data_content_max_length_and_chat_template(tmp_path, tiny_model_dir, data_file):
    recipe = _recipe(tmp_path, tiny_model_dir, data_file)
    tokenizer = load_tokenizer(recipe.model)
    key, parts = cache_key(recipe, tokenizer)
    assert cache_key(recipe, load_tokenizer(recipe.model))[0] == key  # a fresh load: the same key

    # Batching only: the same token ids.
    assert cache_key(_recipe(tmp_path, tiny_model_dir, data_file, packing=True), tokenizer)[0] == key
    # The same content elsewhere: the same entry (a node's local copy finds it).
    moved = shutil.copy(data_file, tmp_path / "elsewhere.jsonl")
    assert cache_key(_recipe(tmp_path, tiny_model_dir, moved), tokenizer)[0] == key

    assert cache_key(_recipe(tmp_path, tiny_model_dir, data_file, max_length=32), tokenizer)[0] != key
    original = data_file.read_text()
    changed = original.replace("copy", "cOpy", 1)  # the same size, one letter other
    assert len(changed) == len(original)
    data_file.write_text(changed)
    assert cache_key(recipe, tokenizer)[0] != key
    data_file.write_text(original)
    assert cache_key(recipe, tokenizer)[0] == key

    # A directory of files: every file's content counts.
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(data_file, folder / "a.jsonl")
    write_jsonl(folder / "b.jsonl", copy_task(8, seed=1))
    in_folder = cache_key(_recipe(tmp_path, tiny_model_dir, folder), tokenizer)[0]
    write_jsonl(folder / "b.jsonl", copy_task(8, seed=2))
    assert cache_key(_recipe(tmp_path, tiny_model_dir, folder), tokenizer)[0] not in (in_folder, key)

    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert cache_key(recipe, tokenizer)[0] != key
    assert set(parts) == {"layout", "data", "split_seed", "task", "tokenizer", "code", "libraries"}


def test_a_damaged_entry_is_rebuilt_never_read(tmp_path, tiny_model_dir, data_file, own_cache, monkeypatch):
    recipe = _recipe(tmp_path, tiny_model_dir, data_file)
    tokenizer = load_tokenizer(recipe.model)
    first, _ = tokenized_data(recipe, tokenizer)
    expected = first.train[:]
    entry = _entry(own_cache)
    arrow = next((entry / "train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped, the size unchanged
    arrow.write_bytes(bytes(data))

    again, found = tokenized_data(recipe, tokenizer)
    assert not found.reused and found.written
    why = f"train/{arrow.name} differs from when it was written"
    assert found.note == f"the cached tokenized data in {entry} is damaged ({why}); tokenized again"
    assert again.train[:] == expected

    (entry / cache.ENTRY_FILE).unlink()  # what a copy cut short would leave
    _, found = tokenized_data(recipe, tokenizer)
    assert not found.reused and "(no entry.json)" in found.note

    record = json.loads((entry / cache.ENTRY_FILE).read_text())
    del record["files"]  # an entry.json edited by hand
    (entry / cache.ENTRY_FILE).write_text(json.dumps(record))
    again, found = tokenized_data(recipe, tokenizer)
    assert not found.reused and "(entry.json is incomplete (KeyError: 'files'))" in found.note
    assert again.train[:] == expected


def test_a_write_cut_short_leaves_no_entry_and_a_killed_writer_leftover_goes(
    tmp_path, tiny_model_dir, data_file, own_cache, monkeypatch
):
    recipe = _recipe(tmp_path, tiny_model_dir, data_file)
    tokenizer = load_tokenizer(recipe.model)

    def cut(path, value):
        assert (path.parent / "train").is_dir()  # the data files are written; entry.json is next
        raise KeyboardInterrupt  # as Ctrl-C would

    with monkeypatch.context() as patch:
        patch.setattr(cache, "_write_json", cut)
        with pytest.raises(KeyboardInterrupt):
            tokenized_data(recipe, tokenizer)
    assert list(own_cache.iterdir()) == []

    # What SIGKILL leaves: a staging directory whose writer is gone. It is never read, and goes on the next write.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key, _ = cache_key(recipe, tokenizer)
    leftover = own_cache / f".{key}-0000dead.partial"
    (leftover / "train").mkdir(parents=True)
    (leftover / WRITER_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    alive = own_cache / f".{key}-0000live.partial"
    alive.mkdir()
    (alive / WRITER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    assert leftovers_under(own_cache) == [(leftover, "an interrupted merge, export or data prepare")]  # peft clean

    _, found = tokenized_data(recipe, tokenizer)
    assert not found.reused and found.path == own_cache / key
    assert not leftover.exists() and alive.exists()  # another live prepare's staging is left alone
    assert remove_dead_staging(own_cache) == []


def test_an_unwritable_cache_is_a_note_for_train_and_an_error_for_prepare(
    tmp_path, tiny_model_dir, data_file, monkeypatch
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "tokenized"))
    recipe = _recipe(tmp_path, tiny_model_dir, data_file)
    data, found = tokenized_data(recipe, load_tokenizer(recipe.model))
    assert not found.written and len(data.train) == 43
    assert found.note.startswith(f"cannot write the tokenized data cache {found.path}: ")
    assert found.note.endswith("; training on the data tokenized now")

    from peftcli.cli.data_prepare import prepare

    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(tmp_path, tiny_model_dir, data_file))
    with pytest.raises(OutputError) as refused:  # a PeftCliError: one line, exit code 2
        prepare(recipe_file, [])
    assert str(refused.value).startswith(f"cannot write the tokenized data cache {found.path}: ")
    assert str(refused.value).endswith("; free space, or set PEFTCLI_DATA_CACHE to a writable directory")


def test_progress_lines_give_counts_rate_and_eta_at_intervals():
    clock = iter([0.0, 1.0, 5.0, 10.0, 12.0, 20.0, 25.0, 30.0])
    lines: list[str] = []
    progress = ProgressLines(lines.append, interval=10.0, now=lambda: next(clock))
    for done in (1, 10, 50, 100, 120, 200, 250):  # at t = 0, 1, 5, 10, 12, 20, 25
        progress("data.train", done, 300)
    progress("data.train", 300, 300)  # t = 30
    assert lines == [
        "tokenizing data.train: 100/300 examples (33%), 10/s, elapsed 0:10, eta 0:20",
        "tokenizing data.train: 200/300 examples (67%), 10/s, elapsed 0:20, eta 0:10",
        "tokenized data.train: 300 examples in 0:30 (10 examples/s)",
    ]


def test_prepare_on_a_terminal_draws_a_bar_per_split():
    import io

    from rich.console import Console

    from peftcli.cli.data_prepare import _progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with _progress(console) as progress:
        for done in range(1, 44):
            progress("data.train", done, 43)
        progress("data.validation", 5, 5)
    text = out.getvalue()
    assert "tokenizing data.train" in text and "43/43" in text
    assert "tokenizing data.validation" in text and "5/5" in text
