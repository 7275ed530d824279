"""`peft eval --lm-eval`: the harness on a tiny run with a local multiple-choice task, checked against the
model's own log-likelihoods."""

from __future__ import annotations

import json

import pytest
import torch

from peftcli.errors import PeftCliError
from peftcli.recipe.load import load_recipe
from peftcli.serve import harness
from peftcli.serve.load import load_run
from peftcli.train.loop import train

from support import make_recipe, run_cli, write_recipe

pytest.importorskip("lm_eval")

WORDS = ["green", "two", "alpha", "delta", "echo", "kilo", "lima", "mike"]
LIMIT = 6


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, copy_data):
    tmp = tmp_path_factory.mktemp("lm-eval")
    recipe = make_recipe(tmp, tiny_model_dir, copy_data, training={"max_steps": 3, "learning_rate": 1e-2})
    train(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
    return tmp / "run"


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task of our own: a local jsonl dataset and its lm-eval YAML config."""
    docs = [{"question": f"copy red {w}", "choices": [w, "blue", "one"], "answer": i % 3} for i, w in enumerate(WORDS)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "copy_choice.yaml").write_text(
        "task: peftcli_copy_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path, docs


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens being those after the context's in the whole."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_lm_eval_accuracy_is_the_models_own_choice(lora_run, task_dir, tmp_path):
    tasks, docs = task_dir
    out = tmp_path / "results.json"
    args = ["eval", str(lora_run), "--lm-eval", "peftcli_copy_choice", "--lm-eval-include", str(tasks)]
    result = run_cli(*args, "--limit", str(LIMIT), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "peftcli_copy_choice" in result.stdout and "acc" in result.stdout
    record = json.loads(out.read_text())
    scores = record["results"]["peftcli_copy_choice"]
    assert record["n-samples"]["peftcli_copy_choice"]["effective"] == LIMIT

    loaded = load_run(lora_run)
    right = 0
    for doc in docs[:LIMIT]:
        scored = [
            _continuation_logprob(loaded.model, loaded.tokenizer, doc["question"], " " + c) for c in doc["choices"]
        ]
        right += int(max(range(3), key=scored.__getitem__) == doc["answer"])
    assert scores["acc,none"] == pytest.approx(right / LIMIT)


def test_lm_eval_refusals(lora_run, task_dir, monkeypatch):
    tasks, _ = task_dir
    with pytest.raises(PeftCliError, match=r"no task named peftcli_nothing in lm-eval or in"):
        harness.task_manager(tasks, ["peftcli_nothing"])
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeftCliError) as missing:
        harness.check_installed()
    assert str(missing.value) == "--lm-eval: the lm-eval harness is not installed; pip install 'peftcli[lm-eval]'"
