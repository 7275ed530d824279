"""Fault injection: runs killed at random steps, stopped before their first checkpoint, started twice on one
directory, or out of disk space end, after `--resume`, with the adapter of a run that was never disturbed;
nothing half-written is left and every failure is one line."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftcli.errors import DiskFullError
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import train
from peftcli.train.run_dir import LOCK_FILE, list_checkpoints, read_jsonl

from support import make_recipe, run_cli, write_recipe

STEPS, SAVE_EVERY = 16, 4
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
WEIGHTS = "adapter_model.safetensors"


def _recipe(tmp_path: Path, model: Path, data: Path, out: Path, **training) -> dict:
    return make_recipe(
        tmp_path,
        model,
        data,
        data={"validation": None},
        training={"max_steps": STEPS, "batch_size": 2, "eval_at_start": False, "save_every": SAVE_EVERY,
                  "keep_checkpoints": 2, **training},
        output={"dir": str(out)},
    )  # fmt: skip


def _start(recipe_file: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftcli", "train", str(recipe_file), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_cli(recipe_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(recipe_file), *args],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, (what, process.communicate())
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory, tiny_model_dir, copy_data) -> Path:
    """The same run, never disturbed."""
    tmp = tmp_path_factory.mktemp("unbroken")
    recipe_file = write_recipe(tmp / "r.yaml", _recipe(tmp, tiny_model_dir, copy_data, tmp / "run"))
    done = _train_cli(recipe_file)
    assert done.returncode == 0, done.stderr
    return tmp / "run"


@pytest.fixture(scope="module")
def unbroken(unbroken_run) -> dict[str, torch.Tensor]:
    """The undisturbed run's adapter."""
    return load_file(str(unbroken_run / WEIGHTS))


def _assert_same_adapter(out: Path, unbroken: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out / WEIGHTS))
    assert got.keys() == unbroken.keys()
    for key in got:  # the same arithmetic on one thread, resumed or not: bit for bit
        assert torch.equal(got[key], unbroken[key]), (key, (got[key] - unbroken[key]).abs().max())
    assert _logged_steps(out) == list(range(1, STEPS + 1))  # every step once, none from before a resume


def test_kill_9_at_random_steps_then_resume_gives_the_unbroken_adapter(tmp_path, tiny_model_dir, copy_data, unbroken):
    out = tmp_path / "run"
    recipe_file = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, out))
    rng = random.Random(int(os.environ.get("PEFTCLI_FAULT_SEED", "18")))
    first, second = rng.randint(1, SAVE_EVERY + 2), rng.randint(SAVE_EVERY + 3, STEPS - 2)
    for number, at_step in enumerate((first, second)):
        process = _start(recipe_file, *(["--resume"] if number else []))
        _wait_for(lambda s=at_step: max(_logged_steps(out), default=0) >= s, process, f"step {at_step}")
        process.kill()
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
        assert not (out / WEIGHTS).exists()
    resumed = _train_cli(recipe_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the lock of a run that is gone" in resumed.stderr
    _assert_same_adapter(out, unbroken)


def test_sigterm_before_the_first_checkpoint_then_resume_gives_the_unbroken_adapter(
    tmp_path, tiny_model_dir, copy_data, unbroken
):
    out = tmp_path / "run"
    recipe_file = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, out))
    process = _start(recipe_file)
    _wait_for((out / LOCK_FILE).is_file, process, "the run lock")  # the run holds its directory and is loading
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    (step, checkpoint), *_ = reversed(list_checkpoints(out))
    assert step < SAVE_EVERY  # the checkpoint the stop wrote is the run's first
    assert f"stopped by SIGTERM after step {step} of {STEPS}; checkpoint written to {checkpoint}" in stderr, stderr
    resumed = _train_cli(recipe_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(out, unbroken)


def test_a_second_run_on_the_same_directory_is_refused_and_the_first_stays_intact(
    tmp_path, tiny_model_dir, copy_data, unbroken
):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, out)
    first_file = write_recipe(tmp_path / "first.yaml", recipe)
    second_file = write_recipe(tmp_path / "second.yaml", {**recipe, "training": {**recipe["training"], "seed": 7}})
    first = _start(first_file)
    _wait_for((out / LOCK_FILE).is_file, first, "the run lock")
    second = run_cli("train", str(second_file))
    _, first_err = first.communicate(timeout=600)

    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"output.dir: {out} is in use by another peft train (pid {first.pid}" in errors[0]
    assert first.returncode == 0, first_err
    assert "seed: 42" in (out / "recipe.yaml").read_text()  # the first run's recipe, untouched by the second
    _assert_same_adapter(out, unbroken)


def test_many_processes_taking_over_one_stale_lock_leave_exactly_one_holder(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "then"}))
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from peftcli.errors import OutputError
        from peftcli.train.run_dir import run_lock
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        try:
            with run_lock(Path({str(out)!r})):
                print("held", flush=True)
                time.sleep(3)
        except OutputError:
            print("refused", flush=True)
    """)
    racers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    time.sleep(3)  # every racer imported and waiting
    go.touch()
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["held"] + ["refused"] * 5, outcomes
    assert not (out / LOCK_FILE).exists()


# --- a full disk ----------------------------------------------------------------------------------------------------


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_a_disk_full_during_a_checkpoint_keeps_the_last_one_resumable(
    tmp_path, tiny_model_dir, copy_data, unbroken, monkeypatch, one_torch_thread
):
    """A fault-injecting write: the third checkpoint's optimizer file fails half-way, as on a full disk."""
    import accelerate.checkpointing

    out = tmp_path / "run"
    recipe = validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, copy_data, out), "r.yaml")
    real_save = accelerate.checkpointing.save

    def save_until_full(obj, path, *args, **kwargs):
        if f"step-{3 * SAVE_EVERY:07d}" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # what reached the disk before it filled
            _enospc()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_full)
    with pytest.raises(DiskFullError) as failed:
        train(recipe)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"output.dir: no space left on device in {out}; removed what was half-written")
    assert f"checkpoint step-{2 * SAVE_EVERY:07d} is intact" in message and "--resume" in message
    assert [step for step, _ in list_checkpoints(out)] == [SAVE_EVERY, 2 * SAVE_EVERY]
    assert not any("step-0000012" in f for f in _files(out)), _files(out)  # the torn checkpoint is gone
    assert not (out / LOCK_FILE).exists()

    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    train(recipe, resume=True)
    _assert_same_adapter(out, unbroken)


def test_a_disk_full_while_saving_the_adapter_removes_it_and_resumes(
    tmp_path, tiny_model_dir, copy_data, unbroken, monkeypatch, one_torch_thread
):
    import peftcli.tuners.adapter

    out = tmp_path / "run"
    recipe = validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, copy_data, out), "r.yaml")

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        _enospc()

    monkeypatch.setattr(peftcli.tuners.adapter, "save_file", half_written)
    with pytest.raises(DiskFullError, match=rf"removed what was half-written \({WEIGHTS}\); checkpoint step-0000012"):
        train(recipe)
    assert not (out / WEIGHTS).exists() and not (out / "summary.json").exists()
    monkeypatch.undo()
    train(recipe, resume=True)
    _assert_same_adapter(out, unbroken)


def test_a_disk_full_before_anything_was_written_leaves_no_directory(
    tmp_path, tiny_model_dir, copy_data, monkeypatch, one_torch_thread
):
    import peftcli.train.loop

    out = tmp_path / "new" / "run"
    recipe = validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, copy_data, out), "r.yaml")
    monkeypatch.setattr(peftcli.train.loop, "write_text_atomic", _enospc)
    with pytest.raises(DiskFullError, match="no checkpoint was complete: free space and run the same command"):
        train(recipe)
    assert not out.exists()


FULL_DISK_SCENARIO = """
import json, os, subprocess, sys
from pathlib import Path
mount, recipe, free = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stats = os.statvfs(mount)
filler = mount / "filler"
filler.write_bytes(b"\\0" * (stats.f_bavail * stats.f_frsize - free))
env = {**os.environ, "OMP_NUM_THREADS": "1"}
def run(*args):
    command = [sys.executable, "-m", "peftcli", "train", recipe, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env)
full = run()
left = sorted(str(p.relative_to(mount / "run")) for p in (mount / "run").rglob("*") if p.is_file())
filler.unlink()
resumed = run("--resume")
kept = Path(sys.argv[4])
if (mount / "run").is_dir():
    import shutil
    shutil.copytree(mount / "run", kept)
outcome = {"full": [full.returncode, full.stderr], "resumed": [resumed.returncode, resumed.stderr]}
print(json.dumps({**outcome, "left": left}))
"""


def test_a_full_tmpfs_gives_one_line_and_the_run_resumes(tmp_path, tiny_model_dir, copy_data, unbroken_run, unbroken):
    """A real full disk: a small tmpfs in a private mount namespace (where the machine allows one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                           capture_output=True, text=True) if shutil.which("unshare") else None  # fmt: skip
    if probe is None or probe.returncode != 0:
        pytest.skip(f"no private tmpfs here ({probe.stderr.strip() if probe else 'no unshare'}); the injected "
                    "faults above cover the same paths")  # fmt: skip
    recipe_file = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, mount / "run"))
    # Room for about half of the run's files (tmpfs counts whole pages): it fills somewhere in the middle.
    pages = sum(-(-p.stat().st_size // 4096) for p in unbroken_run.rglob("*") if p.is_file())
    script = tmp_path / "scenario.py"
    script.write_text(FULL_DISK_SCENARIO)
    kept = tmp_path / "kept"
    command = f"mount -t tmpfs -o size=64m tmpfs {mount} && exec {sys.executable} {script} {mount} {recipe_file} "
    command += f"{pages * 4096 // 2} {kept}"
    scenario = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=ENV)
    assert scenario.returncode == 0, scenario.stderr
    result = json.loads(scenario.stdout.strip().splitlines()[-1])

    status, stderr = result["full"]
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"no space left on device in {mount / 'run'}" in errors[0], stderr
    steps = {name.split("/")[1] for name in result["left"] if name.startswith("checkpoints/")}
    for step in steps:  # every checkpoint left is complete
        assert f"checkpoints/{step}/trainer_state.json" in result["left"], result["left"]
    assert WEIGHTS not in result["left"] or "summary.json" in result["left"]
    assert not any(Path(name).name.startswith(".") for name in result["left"]), result["left"]
    status, stderr = result["resumed"]
    assert status == 0, stderr
    _assert_same_adapter(kept, unbroken)
