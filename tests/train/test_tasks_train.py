"""Each task type trains from a recipe on its tiny model: classification accuracy rises above the
majority-class rate, token tagging likewise, and a T5 learns the copy task and answers in generation."""

from __future__ import annotations

import json

import pytest

from peftcli.examples.tiny import copy_task, marker_classification_task, word_tagging_task, write_jsonl
from peftcli.recipe.load import load_recipe
from peftcli.train.loop import train

from support import make_recipe, write_recipe


def _train(tmp_path, model_dir, rows, task, data_format, steps=60, **training):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = make_recipe(
        tmp_path,
        model_dir,
        data,
        training={"max_steps": steps, "batch_size": 16, "learning_rate": 1e-2, "eval_at_start": True, **training},
    )
    recipe["model"]["task"] = task
    recipe["data"]["train"]["format"] = data_format
    return train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))


@pytest.mark.usefixtures("one_torch_thread")
def test_sequence_classification_beats_the_majority_class(tmp_path, tiny_bert_dir):
    summary = _train(tmp_path, tiny_bert_dir, marker_classification_task(600), "seq_cls", "classification")
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    majority = summary["majority_class_rate"]
    assert summary["label_names"] == ["negative", "neutral", "positive"]
    assert after > max(before, majority) + 0.25, (before, after, majority)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]


@pytest.mark.usefixtures("one_torch_thread")
def test_token_classification_beats_the_majority_class(tmp_path, tiny_bert_token_dir):
    summary = _train(tmp_path, tiny_bert_token_dir, word_tagging_task(600), "token_cls", "token_classification")
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    majority = summary["majority_class_rate"]
    assert summary["label_names"] == ["color", "number", "word"]
    assert after > max(before, majority) + 0.15, (before, after, majority)


@pytest.mark.usefixtures("one_torch_thread")
def test_seq2seq_learns_the_copy_task_and_generates(tmp_path, tiny_t5_dir):
    summary = _train(
        tmp_path,
        tiny_t5_dir,
        copy_task(400),
        "seq2seq",
        "prompt_completion",
        steps=40,
        eval_generation={"prompts": 4, "max_new_tokens": 8, "pattern": "[a-z]"},
    )
    assert summary["eval_after"]["eval_loss"] < 0.5 * summary["eval_before"]["eval_loss"]
    assert summary["generation_after"]["gen_prompts"] == 4
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("copy") for s in samples)
