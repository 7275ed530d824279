"""kto from a recipe: unpaired examples rendered like SFT data with their mismatched rows fixed at preparation,
row errors named, recipe rules, and runs with two methods whose reward margin rises; a CLI run that logs the kto
metrics and resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftcli.data.collate import UnpairedCollator
from peftcli.data.formats import IGNORE_INDEX, Renderer
from peftcli.data.prepare import _tokenize
from peftcli.errors import DataError
from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.objectives.kto import KtoOptions
from peftcli.recipe.load import validate_recipe_dict
from peftcli.recipe.schema import DataSource
from peftcli.train.loop import train
from peftcli.train.objective import TaskObjective
from peftcli.train.preference import StartingPolicy
from peftcli.train.unpaired import METRICS, UnpairedObjective

from support import make_recipe, run_cli, write_recipe


def _examples(count: int, seed: int = 0) -> list[dict]:
    """Copy-task examples: even ones hold the right copy (desirable), odd ones another prompt's answer."""
    rows = copy_task(count, seed)
    return [
        {"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0 else rows[(i + 3) % count]["completion"],
         "label": i % 2 == 0}
        for i, r in enumerate(rows)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("unpaired") / "unpaired.jsonl", _examples(16))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _renderer(tokenizer, max_length=None, **source) -> Renderer:
    source = DataSource.model_construct(path="u.jsonl", format="unpaired_preference", columns={}, system_prompt=None,
                                        **{"prompt_style": "auto", **source})  # fmt: skip
    return Renderer(source, tokenizer, mask_prompt=False, key="data.train", max_length=max_length)


def _tokenized(tokenizer, rows: list[dict], max_length: int = 64, **source):
    from datasets import Dataset

    renderer = _renderer(tokenizer, max_length, **source)  # as prepare_data builds it
    return _tokenize(Dataset.from_list(rows), renderer, max_length, "data.train", None)[:2]  # data, stats


def _completion_text(tokenizer, example: dict, row: str = "") -> str:
    ids, labels = example[f"{row}input_ids"], example[f"{row}labels"]
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_an_example_is_rendered_as_sft_data_with_the_next_examples_completion_as_its_mismatched_row(tokenizer):
    rows = [
        {"prompt": "copy alpha bravo", "completion": "alpha bravo", "label": True},
        {"prompt": "copy charlie", "completion": "delta", "label": False},
        {"prompt": [{"role": "user", "content": "copy echo"}], "completion": [{"role": "assistant", "content": "echo"}],
         "label": "FALSE"},
    ]  # fmt: skip
    data, stats = _tokenized(tokenizer, [rows[0], rows[1]], prompt_style="plain")
    eos = tokenizer.eos_token
    first, second = data[0], data[1]
    assert _completion_text(tokenizer, first).strip() == f"alpha bravo{eos}"  # masked despite mask_prompt: false
    assert _completion_text(tokenizer, first, "mismatched_").strip() == f"delta{eos}"  # example 1's completion
    assert _completion_text(tokenizer, second, "mismatched_").strip() == f"alpha bravo{eos}"  # (1 + 1) mod 2 = 0
    prompt = tokenizer("copy alpha bravo")["input_ids"]
    assert first["input_ids"][: len(prompt)] == first["mismatched_input_ids"][: len(prompt)] == prompt
    assert [first["desirable"], second["desirable"]] == [True, False]
    assert stats.examples == 2 and stats.dropped_no_labels == 0 and stats.truncated == 0
    other = {"prompt": [{"role": "user", "content": "copy alpha bravo"}], "label": "true",
             "completion": [{"role": "assistant", "content": "alpha bravo"}]}  # fmt: skip
    chat, _ = _tokenized(tokenizer, [rows[2], other])  # the tiny tokenizer has a chat template: auto uses it
    assert "echo" in _completion_text(tokenizer, chat[0]) and "copy" not in _completion_text(tokenizer, chat[0])
    assert chat[0]["desirable"] is False and "alpha bravo" in _completion_text(tokenizer, chat[0], "mismatched_")
    batch = UnpairedCollator(tokenizer.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["desirable"].tolist() == [True, False]
    assert batch["input_ids"][2, : len(data[0]["mismatched_input_ids"])].tolist() == data[0]["mismatched_input_ids"]


@pytest.mark.parametrize(
    ("value", "desirable"), [(True, True), (0, False), (1.0, True), ("False", False), (" true ", True)]
)
def test_a_label_is_a_bool_or_unambiguously_written_as_one(tokenizer, value, desirable):
    assert _renderer(tokenizer).desirable(value, 0) is desirable


def test_a_long_example_loses_prompt_tokens_first_and_is_counted_truncated(tokenizer):
    long = {"prompt": " ".join(["word"] * 40), "completion": "alpha bravo", "label": True}
    short = {"prompt": "copy x", "completion": "charlie delta", "label": False}
    whole, _ = _tokenized(tokenizer, [long, short], max_length=256, prompt_style="plain")
    cut, stats = _tokenized(tokenizer, [long, short], max_length=12, prompt_style="plain")
    assert stats.truncated == 1 and len(cut[0]["input_ids"]) <= 12 and len(cut[0]["mismatched_input_ids"]) <= 12
    for row in ("", "mismatched_"):
        assert _completion_text(tokenizer, cut[0], row) == _completion_text(tokenizer, whole[0], row)
        assert cut[0][f"{row}labels"][0] == IGNORE_INDEX  # a prompt token is kept to predict the first one from


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"label": "yes"}, "data.train: example 1: column label is 'yes'; it should say whether"),
        ({"label": 2}, "data.train: example 1: column label is 2"),
        ({"label": None}, "data.train: example 1: column label is empty"),
        ({"completion": None}, "data.train: example 1: column completion is empty"),
        ({"completion": [{"role": "user", "content": "x"}]}, "data.train: example 1: completion should be one"),
        ({"prompt": ""}, "data.train: example 1: column prompt is empty"),
    ],
    ids=["label-yes", "label-2", "label-missing", "completion-missing", "completion-user-turn", "prompt-empty"],
)
def test_a_bad_row_is_named(tokenizer, bad, error):
    rows = [
        {"prompt": "copy a", "completion": "a", "label": True},
        {"prompt": "copy b", "completion": "b", "label": False, **bad},
        {"prompt": "copy c", "completion": "c", "label": True},
    ]
    label = bad.get("label")
    for row in rows[::2]:  # a column holds one type throughout (as in a file)
        row["label"] = str(row["label"]).lower() if isinstance(label, str) else row["label"]
        row["label"] = int(row["label"]) if isinstance(label, int) else row["label"]
    if isinstance(bad.get("completion"), list):
        for row in rows[::2]:
            row["completion"] = [{"role": "assistant", "content": row["completion"]}]
    # example 0 renders example 1's completion as its mismatched row; the fault is still reported as example 1's
    with pytest.raises(DataError, match=error):
        _tokenized(tokenizer, rows, prompt_style="plain")


def test_a_missing_column_is_named(tokenizer):
    with pytest.raises(DataError, match="format unpaired_preference needs column.s. label"):
        _tokenized(tokenizer, [{"prompt": "p", "completion": "c"}])


def test_the_loss_is_a_mean_over_examples_and_the_metrics_split_by_label(tokenizer, load_base):
    """Before any step (policy = reference): every reward, margin and kl is 0 and each loss is its weight / 2."""
    model = load_base()
    data, _ = _tokenized(tokenizer, _examples(4), prompt_style="plain")
    batch = UnpairedCollator(tokenizer.pad_token_id)([data[i] for i in range(4)])
    options = KtoOptions(desirable_weight=2.0, undesirable_weight=0.5)
    objective = UnpairedObjective(options, TaskObjective("causal_lm", model.config), StartingPolicy.snapshot(model))
    assert objective.label_count(batch) == 4
    with torch.no_grad():
        total = objective.loss_sum(model, batch)
    assert total.item() == pytest.approx(2 * (2.0 / 2) + 2 * (0.5 / 2), abs=1e-6)
    means = objective.metric_means(objective.take_metrics("cpu"))
    assert set(means) == set(METRICS) and means["rewards/margin"] == means["kl"] == 0.0
    assert means["logps/chosen"] < 0 and means["logps/rejected"] < 0


def _recipe(tmp_path, model, data, method=None, objective=None, **training):
    recipe = make_recipe(
        tmp_path,
        model,
        data,
        objective=objective or {"name": "kto", "beta": 0.1},
        data={
            "train": {"path": str(data), "format": "unpaired_preference"},
            "validation": {"path": str(data), "format": "unpaired_preference"},  # the same examples: learnt?
            "max_length": 64,
        },
        training={"max_steps": 24, "batch_size": 4, "learning_rate": 0.01, **training},
    )
    if method is not None:
        recipe["method"] = method
    return recipe


@pytest.mark.parametrize(
    "bits",
    [
        {"objective": {"name": "kto"}, "format": "preference",
         "error": "data.train.format: objective kto trains on unpaired examples .prompt, completion, label.; set "
                  "format: unpaired_preference, not preference .format preference trains with objective.name dpo"},
        {"objective": {"name": "dpo"}, "format": "unpaired_preference",
         "error": "data.train.format: objective dpo trains on preference pairs .prompt, chosen, rejected.; set "
                  "format: preference, not unpaired_preference .format unpaired_preference trains with "
                  "objective.name kto"},
        {"objective": {"name": "sft"}, "format": "unpaired_preference",
         "error": "data.train.format: unpaired preference examples need a preference objective; set "
                  "objective.name to kto"},
        {"objective": {"name": "kto"}, "packing": True, "error": "data.packing: objective kto compares each example"},
        {"objective": {"name": "kto", "desirable_weight": 0},
         "error": "objective.desirable_weight: input should be greater than 0"},
    ],
    ids=["kto-on-pairs", "dpo-on-unpaired", "sft-on-unpaired", "packing", "weight-0"],
)  # fmt: skip
def test_impossible_combinations_are_refused_before_loading(tmp_path, tiny_model_dir, unpaired_file, bits):
    recipe = _recipe(tmp_path, tiny_model_dir, unpaired_file, objective=bits["objective"])
    if "format" in bits:
        recipe["data"]["train"]["format"] = recipe["data"]["validation"]["format"] = bits["format"]
    if "packing" in bits:
        recipe["data"]["packing"] = True
    with pytest.raises(Exception, match=bits["error"]):
        validate_recipe_dict(recipe, "r.yaml")


def test_the_cli_refuses_kto_on_pairs_and_dpo_on_unpaired_data_with_exit_code_2(tmp_path, tiny_model_dir):
    path = tmp_path / "missing-model"  # never loaded: the recipe is refused first
    path.mkdir()
    for objective, fmt in (("kto", "preference"), ("dpo", "unpaired_preference")):
        recipe = _recipe(tmp_path, path, tmp_path / "data.jsonl", objective={"name": objective})
        (tmp_path / "data.jsonl").write_text("{}\n")
        recipe["data"]["train"]["format"] = recipe["data"]["validation"]["format"] = fmt
        done = run_cli("train", str(write_recipe(tmp_path / f"{objective}.yaml", recipe)))
        assert done.returncode == 2, done.stderr
        assert f"objective {objective} trains on" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "method",
    [{"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}, {"name": "ia3"}],
    ids=lambda m: m["name"],
)
def test_kto_trains(tmp_path, tiny_model_dir, unpaired_file, method, one_torch_thread):
    summary = train(validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, unpaired_file, method), "r.yaml"))
    before, after = summary["eval_before"], summary["eval_after"]
    # Before the first step the policy is its own reference: rewards, margin and kl are 0, each loss 1 - sigmoid(0)
    assert before["eval_rewards/margin"] == 0 and before["eval_kl"] == 0 and before["eval_examples"] == 16
    assert abs(before["eval_loss"] - 0.5) < 1e-6
    assert after["eval_rewards/margin"] > 0.1 and after["eval_rewards/chosen"] > after["eval_rewards/rejected"], after
    assert after["eval_loss"] < before["eval_loss"] and summary["objective"] == "kto"
    assert "eval_rewards/accuracy" not in after and math.isfinite(after["eval_kl"]) and after["eval_kl"] >= 0


def test_kto_from_the_cli_logs_its_metrics_and_resumes_exactly(tmp_path, tiny_model_dir, unpaired_file):
    """A run stopped after its step-2 checkpoint and resumed ends with the unbroken run's adapter."""
    from safetensors.torch import load_file

    common = {"schedule": "constant", "save_every": 2, "eval_every": None}
    unbroken = write_recipe(tmp_path / "u.yaml", {**_recipe(tmp_path, tiny_model_dir, unpaired_file, max_steps=6,
                                                            **common),
                                                  "output": {"dir": str(tmp_path / "unbroken")}})  # fmt: skip
    done = run_cli("train", str(unbroken))
    assert done.returncode == 0, done.stderr
    assert "reward margin 0.000 ->" in done.stdout + done.stderr, done.stdout
    records = [json.loads(line) for line in (tmp_path / "unbroken" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert set(METRICS) <= steps[0].keys() and "rewards/accuracy" not in steps[0]
    assert all(r["kl"] >= 0 for r in steps)
    summary = json.loads((tmp_path / "unbroken" / "summary.json").read_text())
    assert summary["objective"] == "kto" and {f"eval_{m}" for m in METRICS} <= summary["eval_after"].keys()

    broken = write_recipe(tmp_path / "b.yaml", _recipe(tmp_path, tiny_model_dir, unpaired_file, max_steps=4, **common))
    assert run_cli("train", str(broken)).returncode == 0
    resumed = run_cli("train", str(broken), "--set", "training.max_steps=6", "--resume")
    assert resumed.returncode == 0 and "(step 2 of 6)" in resumed.stdout + resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "unbroken" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_peft_objectives_lists_kto_and_its_options():
    listed = run_cli("objectives")
    assert listed.returncode == 0 and "\n kto " in "\n" + listed.stdout, listed.stdout
    shown = run_cli("objectives", "kto")
    assert shown.returncode == 0 and "desirable_weight" in shown.stdout and "undesirable_weight" in shown.stdout
