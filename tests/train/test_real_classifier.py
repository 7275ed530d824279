"""The real MiniLM encoder classifies tweet sentiment: accuracy climbs from chance well past the majority class."""

from __future__ import annotations

import json

import pytest

from support import REPO, run_cli

pytestmark = pytest.mark.slow


def test_sentiment_recipe_beats_the_majority_class(tmp_path):
    out = tmp_path / "sentiment"
    result = run_cli(
        "train",
        str(REPO / "recipes" / "sentiment-minilm.yaml"),
        "--set", "training.max_steps=60",  # half the recipe's 120 steps, to keep CI short
        "--set", "training.eval_every=null",
        "--set", "data.validation.max_samples=300",  # half the validation tweets: accuracy to about ±3%
        "--set", f"output.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before = summary["eval_before"]["eval_accuracy"]
    after = summary["eval_after"]["eval_accuracy"]
    majority = summary["majority_class_rate"]
    assert summary["label_names"] == ["negative", "neutral", "positive"]
    assert after > majority + 0.1 and after > before + 0.3, (before, after, majority)
    assert "validation accuracy" in result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
