"""Experiment trackers on the tiny model, each read back with its own library: TensorBoard's event reader, the
MLflow client, and W&B's offline run file. Every tracker must hold exactly the numbers of metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import SilentReporter, train
from peftcli.train.preemption import RunStopped

from support import make_recipe, write_recipe

ALL = ["tensorboard", "mlflow", "wandb"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def user_without_tracker_settings(monkeypatch, tmp_path):
    """The default path of a user who configured no tracker: nothing online, no server."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # not the developer's own settings
    # (delenv also removes after the test what the trainer sets for the process, e.g. MLFLOW_ALLOW_FILE_STORE)


def _recipe(tmp_path, tiny_model_dir, copy_data, report_to, **training):
    settings = {"max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2, "report_to": report_to}
    return validate_recipe_dict(
        make_recipe(tmp_path, tiny_model_dir, copy_data, training={**settings, **training}), "test.yaml"
    )


class Messages(SilentReporter):
    def __init__(self):
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value}, with the tag names the README promises."""
    expected: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        kind = record["type"]
        for key, value in record.items():
            if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"{kind}/{key[len(kind) + 1 :] if key.startswith(kind + '_') else key}"
            expected.setdefault(tag, {})[record["step"]] = float(value)
    return expected


def _leaves(data, prefix=""):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, data


def _tensorboard(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads its file store only when allowed
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    return client, client.get_run(ids["run_id"])


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, payload = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(payload)
            payload = b""


def _wandb(run_dir: Path):
    """The offline run's config, history (tag -> {step: value}) and summary."""
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    config, history, summary = {}, {}, {}

    def key(item) -> str:  # a plain key, or a path (W&B writes a key with '/' as a path of one part)
        return item.key or "/".join(item.nested_key)

    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {key(item): json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            for item in record.history.item:
                if not key(item).startswith("_"):
                    values = history.setdefault(key(item), {})
                    values[record.history.step.num] = float(json.loads(item.value_json))
        elif kind == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
    return run_file, config, history, summary


def test_every_tracker_holds_the_metrics_of_metrics_jsonl_and_the_recipe(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, ALL)
    messages = Messages()
    summary = train(recipe, reporter=messages)
    run_dir = tmp_path / "run"
    expected = _expected(run_dir)
    assert {"train/loss", "train/lr", "eval/loss"} <= expected.keys()
    assert sorted(expected["eval/loss"]) == [0, 2, 4] and sorted(expected["train/loss"]) == [1, 2, 3, 4]
    saved_recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert not [line for line in messages.lines if line.startswith("warning")], messages.lines

    # TensorBoard stores float32
    scalars = _tensorboard(run_dir)
    for tag, values in expected.items():
        assert scalars[tag] == pytest.approx(values, rel=2**-23), tag
    assert scalars["summary/final_train_loss"] == pytest.approx({4: summary["final_train_loss"]}, rel=2**-23)

    client, run = _mlflow(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.r"] == "4" and run.data.params["training.learning_rate"] == "0.003"
    assert run.data.params["training.report_to"] == json.dumps(ALL)
    assert run.data.params.keys() == {key for key, _ in _leaves(saved_recipe)}
    for tag, values in expected.items():
        history = client.get_metric_history(run.info.run_id, tag)
        assert {m.step: m.value for m in history} == values, tag
        assert len(history) == len(values), tag
    assert run.data.metrics["summary/final_train_loss"] == summary["final_train_loss"]

    run_file, config, history, wandb_summary = _wandb(run_dir)
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"] in run_file.name
    assert {key: config[key] for key in saved_recipe} == saved_recipe
    for tag, values in expected.items():
        assert history[tag] == values, tag
    assert wandb_summary["summary/final_train_loss"] == summary["final_train_loss"]
    assert any(line.startswith("wandb: offline run in") for line in messages.lines), messages.lines


class _SignalAfter(SilentReporter):
    """Sends SIGTERM to this process after a given step, as a scheduler would."""

    def __init__(self, step: int):
        self.at = step

    def step(self, metrics: dict) -> None:
        if metrics["step"] == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stopped_run_resumes_the_same_tracker_runs(tmp_path, tiny_model_dir, copy_data):
    """Stopped by SIGTERM after step 3 (checkpoint 3), then resumed: one MLflow run, one W&B id, and each
    tracker holds each step once, equal to metrics.jsonl."""
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, ALL, max_steps=6, eval_every=None)
    with pytest.raises(RunStopped):
        train(recipe, reporter=_SignalAfter(3))
    run_dir = tmp_path / "run"
    first_ids = json.loads((run_dir / "trackers.json").read_text())
    assert _mlflow(run_dir)[1].info.status == "KILLED"

    train(recipe, resume=True)
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids == first_ids
    client, run = _mlflow(run_dir)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    expected = _expected(run_dir)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5, 6]
    scalars = _tensorboard(run_dir)
    for tag, values in expected.items():
        history = client.get_metric_history(run.info.run_id, tag)
        assert sorted((m.step, m.value) for m in history) == sorted(values.items()), tag
        assert scalars[tag] == pytest.approx(values, rel=2**-23), tag
    # W&B offline writes one file per session, both for the same run id
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    run_ids = [next(r.run.run_id for r in _wandb_records(f) if r.WhichOneof("record_type") == "run") for f in files]
    assert run_ids == [ids["wandb"]["id"]] * 2


def test_a_failing_tracker_is_dropped_with_one_warning_and_training_goes_on(
    tmp_path, tiny_model_dir, copy_data, monkeypatch
):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def broken(self, tag, value, step, *args, **kwargs):
        calls.append(step)
        if step >= 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    messages = Messages()
    summary = train(_recipe(tmp_path, tiny_model_dir, copy_data, ["tensorboard", "mlflow"]), reporter=messages)
    assert summary["steps"] == 4
    warnings = [line for line in messages.lines if line.startswith("warning")]
    assert len(warnings) == 1 and "tensorboard tracker failed" in warnings[0], messages.lines
    assert max(calls) == 2  # nothing more reached the dropped tracker
    client, run = _mlflow(tmp_path / "run")  # the other tracker got everything
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == {1, 2, 3, 4}


def test_a_tracker_that_cannot_start_does_not_block_the_run(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 2, "report_to": ["mlflow"]})
    recipe["training"]["tracking"] = {"mlflow": {"tracking_uri": "nosuchscheme://tracker"}}
    messages = Messages()
    assert train(validate_recipe_dict(recipe, "test.yaml"), reporter=messages)["steps"] == 2
    warnings = [line for line in messages.lines if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: training.report_to: mlflow could not start")


def test_wandb_goes_online_only_when_configured(monkeypatch):
    from peftcli.train.trackers import wandb_mode

    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("CI", "true")
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") is None  # wandb reads WANDB_MODE itself


def test_a_missing_tracker_package_is_one_line_and_exit_2(tmp_path, tiny_model_dir, copy_data, monkeypatch, capsys):
    from peftcli.cli.app import main

    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"report_to": ["tensorboard", "wandb"]})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that cannot be imported
    monkeypatch.setattr(sys, "argv", ["peft", "train", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: training.report_to: wandb is not installed; install with pip install 'peftcli[wandb]' "
        "(or remove it from training.report_to)"
    ]
    assert not (tmp_path / "run").exists()


def test_report_to_is_strict():
    from peftcli.errors import RecipeError

    for report_to, message in ((["comet"], "tensorboard"), (["mlflow", "mlflow"], "mlflow listed twice")):
        with pytest.raises(RecipeError, match=message):
            validate_recipe_dict(
                {
                    "model": {"name_or_path": "org/model"},
                    "method": {"name": "lora"},
                    "data": {"train": {"path": "org/data", "format": "text"}},
                    "training": {"report_to": report_to},
                    "output": {"dir": "run"},
                },
                "test.yaml",
            )


class _CrashAfter(SilentReporter):
    def __init__(self, step: int):
        self.at = step

    def step(self, metrics: dict) -> None:
        if metrics["step"] == self.at:
            raise RuntimeError("simulated crash")


def test_a_crashed_run_is_failed_in_mlflow_and_its_redone_steps_are_logged_again(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, ["mlflow"], eval_every=None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, reporter=_CrashAfter(3))  # checkpoint at step 2, step 3 logged, then the crash
    run_dir = tmp_path / "run"
    assert _mlflow(run_dir)[1].info.status == "FAILED"
    train(recipe, resume=True)
    client, run = _mlflow(run_dir)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4]
    # an exact resume redoes step 3 with the same loss; the newest value is metrics.jsonl's
    assert {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)} == _expected(run_dir)["train/loss"]
