"""`peft train` stopped by a scheduler's SIGTERM or by Ctrl-C: it finishes the step, writes a checkpoint, says
how to continue and exits 128 + the signal's number (that --resume then ends with the unbroken run's adapter is
tests/cli/test_faults.py's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from peftcli.train.run_dir import list_checkpoints

from support import make_recipe, write_recipe

STEPS = 60  # more than run before the signal lands (a step of the tiny model takes tens of ms)


def _start(recipe_file) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "peftcli", "train", str(recipe_file)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_after_first_step(process: subprocess.Popen, metrics, number: int) -> tuple[int, str]:
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"type": "train"' in metrics.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.05)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _recipe(tmp_path, tiny_model_dir, copy_data, name: str):
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        data={"validation": None},
        training={"max_steps": STEPS, "batch_size": 2, "eval_at_start": False, "save_every": 1000},
        output={"dir": str(tmp_path / name)},
    )
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_a_stopped_run_saves_a_checkpoint_and_says_how_to_continue(
    tmp_path, tiny_model_dir, copy_data, number, one_torch_thread
):
    recipe_file = _recipe(tmp_path, tiny_model_dir, copy_data, "stopped")
    out = tmp_path / "stopped"
    status, stderr = _stop_after_first_step(_start(recipe_file), out / "metrics.jsonl", number)

    assert status == 128 + number, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    (step, checkpoint), *_ = reversed(list_checkpoints(out))
    assert 0 < step < STEPS
    name = signal.Signals(number).name
    expected = f"stopped by {name} after step {step} of {STEPS}; checkpoint written to {checkpoint}; continue"
    assert expected in " ".join(stderr.split()), stderr
    assert not (out / "adapter_model.safetensors").exists()  # not finished: no adapter that looks final
    # --resume from such a checkpoint ends with the unbroken run's adapter: tests/cli/test_faults.py
