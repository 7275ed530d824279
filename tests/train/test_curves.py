"""curves.png: written at the end of a tiny run, a PNG of the expected size whose drawn lines are the run's
metrics.jsonl; preference runs add accuracy and margin panels; a drawing failure only warns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from peftcli.errors import OutputError
from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train import loop
from peftcli.train.curves import RunMetrics, moving_mean, overlay_figure, read_run, run_figure
from peftcli.train.loop import SilentReporter, train

from support import make_recipe


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _points(records: list[dict], key: str) -> np.ndarray:
    return np.array([[r["step"], r[key]] for r in records if r.get(key) is not None], dtype=float)


def _lines(ax) -> dict[str, np.ndarray]:
    return {line.get_label(): line.get_xydata() for line in ax.lines}


def test_a_run_ends_with_curves_png_of_its_metrics(tmp_path, tiny_model_dir, copy_data, one_torch_thread):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 6, "eval_every": 3})
    train(validate_recipe_dict(recipe, "r.yaml"))
    run_dir = tmp_path / "run"
    # Two panels (loss, learning rate) side by side: 2 x 6 in by 3.6 in at 100 dpi.
    assert imread(run_dir / "curves.png").shape == (360, 1200, 4)
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    records = _records(run_dir)
    figure = run_figure(read_run(run_dir))
    assert figure.get_suptitle() == "run (lora, sft)"
    loss, rate = figure.axes
    assert (loss.get_title(), rate.get_title()) == ("loss", "learning rate")
    drawn = _lines(loss)
    assert set(drawn) == {"train loss", "eval loss"}
    np.testing.assert_array_equal(drawn["train loss"], _points(records, "loss"))
    np.testing.assert_array_equal(drawn["eval loss"], _points(records, "eval_loss"))
    assert list(drawn["eval loss"][:, 0]) == [0, 3, 6]  # the evaluation before training is drawn at step 0
    np.testing.assert_array_equal(_lines(rate)["learning rate"], _points(records, "lr"))


def _pairs(count: int) -> list[dict]:
    rows = copy_task(count)
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % count]["completion"]}
            for i, r in enumerate(rows)]  # fmt: skip


def test_a_preference_run_draws_reward_accuracy_and_margin(tmp_path, tiny_model_dir, one_torch_thread):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        pairs,
        objective={"name": "dpo", "beta": 0.1},
        data={
            "train": {"path": str(pairs), "format": "preference"},
            "validation": {"path": str(pairs), "format": "preference"},
            "max_length": 64,
        },  # fmt: skip
        training={"max_steps": 3, "batch_size": 4, "learning_rate": 0.01},
    )
    train(validate_recipe_dict(recipe, "r.yaml"))
    run_dir = tmp_path / "run"
    records = _records(run_dir)
    figure = run_figure(read_run(run_dir))
    assert figure.get_suptitle() == "run (lora, dpo)"
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert list(panels) == ["loss", "learning rate", "accuracy", "reward margin"]
    accuracy, margin = _lines(panels["accuracy"]), _lines(panels["reward margin"])
    np.testing.assert_array_equal(accuracy["train reward accuracy"], _points(records, "rewards/accuracy"))
    np.testing.assert_array_equal(accuracy["eval reward accuracy"], _points(records, "eval_rewards/accuracy"))
    np.testing.assert_array_equal(margin["eval reward margin"], _points(records, "eval_rewards/margin"))
    assert imread(run_dir / "curves.png").shape == (720, 1200, 4)  # four panels: two rows


class Messages(SilentReporter):
    def __init__(self):
        self.lines = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_drawing_failure_warns_and_the_run_still_finishes(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    def broken(run_dir):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(loop, "write_run_curves", broken)
    reporter = Messages()
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 2})
    summary = train(validate_recipe_dict(recipe, "r.yaml"), reporter=reporter)
    assert summary["steps"] == 2 and (tmp_path / "run" / "summary.json").is_file()
    assert not (tmp_path / "run" / "curves.png").exists()
    assert [line for line in reporter.lines if "curves" in line] == [
        "warning: curves.png not drawn (RuntimeError: no fonts)"
    ]


def test_a_long_train_curve_is_drawn_raw_and_with_its_moving_mean(tmp_path):
    losses = list(np.random.default_rng(0).normal(3.0, 0.5, 200))
    records = [{"type": "train", "step": i + 1, "loss": v, "lr": 1e-3} for i, v in enumerate(losses)]
    figure = run_figure(RunMetrics(tmp_path / "long", records, {}, {"method": {"name": "ia3"}}))
    drawn = _lines(figure.axes[0])
    assert set(drawn) == {"train loss (raw)", "train loss"}
    np.testing.assert_array_equal(drawn["train loss (raw)"][:, 1], losses)
    # a trailing mean over 200 // 25 = 8 points (fewer at the start)
    expected = [np.mean(losses[max(0, i - 7) : i + 1]) for i in range(200)]
    np.testing.assert_allclose(drawn["train loss"][:, 1], expected, rtol=1e-12)
    assert moving_mean([1.0, float("nan"), 3.0]) == [1.0, 1.0, 3.0]  # pairs; a NaN is a gap, not a poison
    assert set(_lines(figure.axes[1])) == {"learning rate"}  # a schedule is not noise: never smoothed


def test_only_run_directories_are_read(tmp_path):
    with pytest.raises(OutputError, match="not a run directory"):
        read_run(tmp_path)
    (tmp_path / "recipe.yaml").write_text("model: {}\n")
    with pytest.raises(OutputError, match="no metrics logged yet"):
        read_run(tmp_path)


def test_runs_with_the_same_name_are_told_apart_by_their_path(tmp_path):
    records = [{"type": "train", "step": 1, "loss": 2.0}, {"type": "train", "step": 2, "loss": 1.5}]
    first = RunMetrics(tmp_path / "x" / "run", records, {}, {"method": {"name": "lora"}})
    second = RunMetrics(tmp_path / "y" / "run", records, {}, {"method": {"name": "ia3"}, "model": {"task": "seq_cls"}})
    (ax,) = overlay_figure([first, second], ["loss"]).axes
    assert [line.get_label() for line in ax.lines] == [
        f"{tmp_path / 'x' / 'run'} (lora, sft)",
        f"{tmp_path / 'y' / 'run'} (ia3, sft, seq_cls)",
    ]
