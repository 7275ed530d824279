"""One `peft train` per run directory: a second one is refused naming the holder, a lock left by a process
that is gone is taken over, and a run that fails before it starts leaves no directory behind."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from peftcli.errors import OutputError
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import SilentReporter, train
from peftcli.train.run_dir import LOCK_FILE, run_lock

from support import make_recipe, run_cli, write_recipe


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(tmp_path, tiny_model_dir, copy_data):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": gone.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(holder))
    messages = []

    class Recorder(SilentReporter):
        def message(self, text: str) -> None:
            messages.append(text)

    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 1})
    summary = train(validate_recipe_dict(recipe, "test.yaml"), reporter=Recorder())
    assert summary["steps"] == 1
    holder = f"pid {gone.pid} on {socket.gethostname()}, since 2026-01-01 00:00:00"
    assert f"note: took over the lock of a run that is gone ({holder})" in messages
    assert not (out / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": 1, "host": "some-other-machine", "started": "2026-01-01 00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(holder))
    with (
        pytest.raises(
            OutputError, match=rf"pid 1 on some-other-machine.*if that run is gone, delete {out / LOCK_FILE}"
        ),
        run_lock(out),
    ):
        pass
    assert (out / LOCK_FILE).is_file()  # someone else's lock is never removed


def test_a_run_refused_before_it_starts_leaves_no_directory(tmp_path, tiny_model_dir, copy_data):
    out = tmp_path / "new" / "run"
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, output={"dir": str(out)})
    recipe["data"]["train"]["columns"] = {"prompt": "no_such_column"}
    with pytest.raises(Exception, match="no_such_column"):
        train(validate_recipe_dict(recipe, "test.yaml"))
    assert not out.exists()


def test_an_output_dir_that_cannot_be_created_is_one_line_before_anything_loads(tmp_path, tiny_model_dir, copy_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, output={"dir": str(blocker / "run")})
    result = run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = f"error: output.dir: {blocker / 'run'} cannot be created (Not a directory); choose a writable place"
    assert errors == [expected]
    assert "loading" not in result.stderr  # refused before the tokenizer or the model loads
