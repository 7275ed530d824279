"""Merge and export under faults: interrupted, out of space, on an unfinished or damaged run, a moved base, and
what killed ones left behind (cleaned on the next write, or by `peft clean`)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from peftcli.errors import DiskFullError
from peftcli.export.merge import merge_adapter_dir
from peftcli.recipe.load import load_recipe
from peftcli.train.loop import train
from peftcli.train.safe_write import WRITER_FILE

from support import make_recipe, run_cli, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, copy_data):
    tmp = tmp_path_factory.mktemp("faults")
    recipe = make_recipe(tmp, tiny_model_dir, copy_data, data={"validation": None},
                         training={"max_steps": 4, "save_every": 2, "eval_at_start": False})  # fmt: skip
    train(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
    return tmp / "run"


def _one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_merging_an_unfinished_run_says_to_resume_it(finished_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (unfinished / name).unlink()
    for command in (["merge", str(unfinished)], ["export", str(unfinished), "--format", "gguf"]):
        line = _one_error(run_cli(*command))
        assert f"{unfinished}: this run has not finished (its newest checkpoint is step-0000002)" in line
        assert "--resume" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_adapter_file_is_one_line_on_merge_and_export(finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    for command in (["merge", str(run)], ["export", str(run), "--format", "peft"]):
        line = _one_error(run_cli(*command))
        assert f"{weights}: cannot be read" in line and "truncated or damaged" in line
    assert not (tmp_path / "run-merged").exists() and not (tmp_path / "run-peft").exists()


def test_a_moved_base_points_at_base(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    recipe = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace("name_or_path: ", f"name_or_path: {tmp_path}/moved", 1))
    line = _one_error(run_cli("merge", str(run)))
    assert "model.name_or_path" in line and "if the base model moved, pass --base PATH" in line


def test_a_merge_that_cannot_fit_is_refused_before_writing(finished_run, tmp_path, monkeypatch):
    import peftcli.train.safe_write

    monkeypatch.setattr(peftcli.train.safe_write, "free_bytes", lambda _directory: 1000)
    with pytest.raises(DiskFullError, match=r"merged needs 0\.\d\d GB but its disk has 0\.00 GB free"):
        merge_adapter_dir(finished_run, tmp_path / "merged")
    assert sorted(tmp_path.iterdir()) == []


def test_a_merge_that_fills_the_disk_leaves_nothing_and_says_so(finished_run, tmp_path, monkeypatch):
    from peftcli.export.safetensors_stream import ShardSetWriter

    real_write, calls = ShardSetWriter.write, []

    def fills_up(self, name, value):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, name, value)

    monkeypatch.setattr(ShardSetWriter, "write", fills_up)
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {tmp_path / 'merged'}; nothing"):
        merge_adapter_dir(finished_run, tmp_path / "merged")
    assert sorted(tmp_path.iterdir()) == []  # no output, no hidden staging directory


SLOW_MERGE = """
import sys, time
from pathlib import Path
import peftcli.export.safetensors_stream as stream
real, started = stream.ShardSetWriter.write, Path(sys.argv[3])
def slow(self, name, value):
    started.touch()
    time.sleep(0.2)
    return real(self, name, value)
stream.ShardSetWriter.write = slow
sys.argv = ["peft", "merge", sys.argv[1], "-o", sys.argv[2]]
from peftcli.cli.app import main
main()
"""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_an_interrupted_merge_says_so_and_leaves_nothing(finished_run, tmp_path, number):
    out, started = tmp_path / "merged", tmp_path / "writing"
    command = [sys.executable, "-c", SLOW_MERGE, str(finished_run), str(out), str(started)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + number, stderr
    name = signal.Signals(number).name
    assert stderr.strip().splitlines()[-1] == f"interrupted by {name}; nothing half-written was left behind"
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _writer(pid: int) -> str:
    return json.dumps({"pid": pid, "host": os.uname().nodename, "started": "earlier"})


def test_leftovers_of_a_killed_merge_are_removed_by_the_next_one_with_a_note(finished_run, tmp_path):
    leftover = tmp_path / ".merged.partial"
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (leftover / WRITER_FILE).write_text(_writer(_dead_pid()))
    result = run_cli("merge", str(finished_run), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert f"note: removed {leftover} (0.00 GB), left by an interrupted merge or export" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_merge_refuses_an_output_another_live_merge_is_writing(finished_run, tmp_path):
    busy = tmp_path / ".merged.partial"
    busy.mkdir()
    (busy / WRITER_FILE).write_text(_writer(os.getpid()))  # this test process: alive
    line = _one_error(run_cli("merge", str(finished_run), "-o", str(tmp_path / "merged")))
    assert f"{tmp_path / 'merged'} is being written by another peft command (pid {os.getpid()}" in line
    assert busy.is_dir()


def test_peft_clean_lists_then_removes_leftovers_and_spares_live_writers(finished_run, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run"
    shutil.copytree(finished_run, run)
    dead = _dead_pid()
    (run / ".peftcli.lock").write_text(_writer(dead))
    torn = run / "checkpoints" / "step-0000003"
    torn.mkdir()
    (torn / "optimizer.bin").write_bytes(b"\0" * 10)
    killed = runs / ".run-merged.partial"
    killed.mkdir()
    (killed / WRITER_FILE).write_text(_writer(dead))
    temp = runs / f".run-q8_0.gguf.peftcli-{os.uname().nodename}-{dead}.tmp"
    temp.write_bytes(b"\0" * 10)
    live = runs / ".other-merged.partial"
    live.mkdir()
    (live / WRITER_FILE).write_text(_writer(os.getpid()))

    listed = run_cli("clean", str(runs), "--dry-run")
    assert listed.returncode == 0, listed.stderr
    expected = [killed, temp, run / ".peftcli.lock", torn]
    for path in expected:
        assert f"would remove {path} (" in listed.stdout, listed.stdout
        assert path.exists()
    assert str(live) not in listed.stdout and "4 leftover(s); would free" in listed.stdout

    cleaned = run_cli("clean", str(runs))
    assert cleaned.returncode == 0, cleaned.stderr
    assert not any(path.exists() for path in expected) and live.is_dir()
    assert (run / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()  # complete ones stay
    assert run_cli("clean", str(runs)).stdout.strip() == f"nothing to clean in {runs}"


def test_dry_run_refuses_a_target_module_the_model_does_not_have(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data)
    recipe["method"]["target_modules"] = ["q_proj", "no_such_proj"]
    line = _one_error(run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--dry-run"))
    assert "method.target_modules: no_such_proj matched nothing; candidates:" in line
    recipe["method"]["target_modules"] = ["q_proj"]
    plan = run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--dry-run")
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert plan.returncode == 0 and re.search(rf"adapts +{layers} modules", plan.stdout), plan.stdout
    assert not (tmp_path / "run").exists()
