"""`peft eval` reproduces the loop's final evaluation for a preference objective and for a classifier."""

from __future__ import annotations

import pytest

from peftcli.examples.tiny import copy_task, marker_classification_task, write_jsonl
from peftcli.recipe.load import load_recipe
from peftcli.serve.score import DataChoice, evaluate_run
from peftcli.train.loop import train

from support import make_recipe, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _final_and_ours(tmp_path, recipe: dict) -> tuple[dict, dict]:
    summary = train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    return summary["eval_after"], evaluate_run(tmp_path / "run", DataChoice())


def test_dpo_metrics_equal_the_runs_final_evaluation(tmp_path, tiny_model_dir):
    rows = copy_task(24)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
        for i, r in enumerate(rows)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        data,
        objective={"name": "dpo", "beta": 0.1},
        data={"train": {"path": str(data), "format": "preference"}, "validation": {"fraction": 0.25}},
        training={"max_steps": 4, "eval_every": 4, "learning_rate": 1e-2},
    )
    final, ours = _final_and_ours(tmp_path, recipe)
    # The reference is rebuilt as the run started (a fresh LoRA: the base); its rewards are measured against it.
    metrics = [key for key in final if key not in ("type", "step")]
    assert len(metrics) > 3 and "eval_loss" in metrics  # rewards, margin, accuracy, log-probabilities too
    for key in metrics:
        assert ours[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key


def test_classifier_accuracy_equals_the_runs_final_evaluation(tmp_path, tiny_bert_dir):
    data = write_jsonl(tmp_path / "data.jsonl", marker_classification_task(120))
    recipe = make_recipe(tmp_path, tiny_bert_dir, data, training={"max_steps": 4, "eval_every": 4, "batch_size": 8})
    recipe["model"]["task"] = "seq_cls"
    recipe["data"]["train"]["format"] = "classification"
    final, ours = _final_and_ours(tmp_path, recipe)
    assert ours["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert (ours["eval_accuracy"], ours["eval_labels"]) == (final["eval_accuracy"], final["eval_labels"])
