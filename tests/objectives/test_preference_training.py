"""Preference training from a recipe: pairs rendered like SFT data, summed completion log-probabilities checked
token by token, recipe rules, and dpo/orpo/simpo runs with several methods that rank their pairs right."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftcli.data.collate import PairCollator
from peftcli.data.formats import IGNORE_INDEX, Renderer
from peftcli.errors import DataError
from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.objectives.dpo import DpoOptions
from peftcli.recipe.load import validate_recipe_dict
from peftcli.recipe.schema import DataSource
from peftcli.train.head_loss import OutputHead
from peftcli.train.loop import train
from peftcli.train.objective import TaskObjective
from peftcli.train.preference import PreferenceObjective

from support import make_recipe, run_cli, write_recipe


def _pairs(count: int, seed: int = 0) -> list[dict]:
    """Copy-task pairs: the right copy is chosen, another example's answer is rejected."""
    rows = copy_task(count, seed)
    return [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % count]["completion"]}
        for i, r in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", _pairs(16))


def _renderer(tokenizer, max_length=None, **source) -> Renderer:
    source = DataSource.model_construct(path="pairs.jsonl", format="preference", columns={}, system_prompt=None,
                                        **{"prompt_style": "auto", **source})  # fmt: skip
    return Renderer(source, tokenizer, mask_prompt=False, key="data.train", max_length=max_length)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _completion_text(tokenizer, example: dict, side: str = "") -> str:
    ids, labels = example[f"{side}input_ids"], example[f"{side}labels"]
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_a_text_pair_is_rendered_as_sft_data_with_labels_on_each_completion(tokenizer):
    row = {"prompt": "copy alpha bravo", "chosen": "alpha bravo", "rejected": "charlie"}
    example = _renderer(tokenizer, prompt_style="plain")(row, 0)
    eos = tokenizer.eos_token
    assert _completion_text(tokenizer, example).strip() == f"alpha bravo{eos}"  # masked despite mask_prompt: false
    assert _completion_text(tokenizer, example, "rejected_").strip() == f"charlie{eos}"
    prompt = tokenizer("copy alpha bravo")["input_ids"]
    assert example["input_ids"][: len(prompt)] == example["rejected_input_ids"][: len(prompt)] == prompt


def test_chat_pairs_and_whole_conversations_label_only_the_last_assistant_turn(tokenizer):
    chat = _renderer(tokenizer)  # the tiny tokenizer has a chat template: prompt_style auto uses it
    as_text = chat({"prompt": "hi", "chosen": "yes", "rejected": "no"}, 0)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}]
    whole = chat(
        {
            "chosen": [*history, {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}],
            "rejected": [*history, {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}],
        },
        1,
    )
    for example in (as_text, whole):
        assert "yes" in _completion_text(tokenizer, example) and "no" in _completion_text(
            tokenizer, example, "rejected_"
        )
    assert "old" not in _completion_text(tokenizer, whole)  # the shared earlier turn is context, not a label
    with pytest.raises(DataError, match="data.train: example 3: without a prompt, chosen must be a conversation"):
        chat({"chosen": [{"role": "user", "content": "x"}], "rejected": "no"}, 3)
    with pytest.raises(DataError, match="data.train: example 4: chosen and rejected are the same"):
        chat({"prompt": "p", "chosen": "same", "rejected": "same"}, 4)


def test_a_long_pair_loses_prompt_tokens_first_and_keeps_its_completion(tokenizer):
    prompt = " ".join(["word"] * 40)
    row = {"prompt": prompt, "chosen": "alpha bravo", "rejected": "charlie delta"}
    whole = _renderer(tokenizer, prompt_style="plain")(row, 0)
    cut = _renderer(tokenizer, prompt_style="plain", max_length=12)(row, 0)
    assert cut["truncated"] and len(cut["input_ids"]) <= 12 and len(cut["rejected_input_ids"]) <= 12
    for side in ("", "rejected_"):
        assert _completion_text(tokenizer, cut, side) == _completion_text(tokenizer, whole, side)
        labels = cut[f"{side}labels"]
        assert labels[0] == IGNORE_INDEX  # a prompt token is kept to predict the first completion token from


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked-head"])
def test_summed_completion_logps_equal_a_token_by_token_computation(tokenizer, load_base, chunked):
    model = load_base()
    renderer = _renderer(tokenizer, prompt_style="plain")
    batch = PairCollator(tokenizer.pad_token_id)([renderer(row, i) for i, row in enumerate(_pairs(3))])
    tokens = TaskObjective("causal_lm", model.config, head=OutputHead(model) if chunked else None)
    with torch.no_grad():
        logps = PreferenceObjective(DpoOptions(), tokens).pair_logps(model, batch)
        expected = []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            total = 0.0
            for t in range(1, int(mask.sum())):
                if labels[t] != IGNORE_INDEX:  # token t scored from the tokens before it, alone
                    logits = model(input_ids=ids[None, :t]).logits[0, -1]
                    total += torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
            expected.append(total)
    got = torch.cat([logps.chosen, logps.rejected]).double()
    # fp32 logits of a few tens of tokens: sums of about -50 agree to fp32 rounding of each term
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0), (got, expected)
    counts = torch.cat([logps.chosen_tokens, logps.rejected_tokens])
    assert counts.tolist() == [int((row[1:] != IGNORE_INDEX).sum()) for row in batch["labels"]]


def _recipe(tmp_path, model, pairs, method=None, objective=None, **training):
    recipe = make_recipe(
        tmp_path,
        model,
        pairs,
        objective=objective or {"name": "dpo", "beta": 0.1},
        data={
            "train": {"path": str(pairs), "format": "preference"},
            "validation": {"path": str(pairs), "format": "preference"},  # the same pairs: were they learnt?
            "max_length": 64,
        },
        training={"max_steps": 24, "batch_size": 4, "learning_rate": 0.01, **training},
    )
    if method is not None:
        recipe["method"] = method
    return recipe


@pytest.mark.parametrize(
    "recipe_bits",
    [
        {
            "yaml": "method: sft with preference data",
            "objective": {"name": "sft"},
            "error": "need a preference objective",
        },
        {"yaml": "dpo on prompt/completion data", "format": "prompt_completion", "error": "set format: preference"},
        {"yaml": "packing", "packing": True, "error": "data.packing: objective dpo compares each pair"},
        {
            "yaml": "live reference under zero3",
            "objective": {"name": "dpo", "reference": "live"},
            "launch": {"preset": "zero3", "nproc": 2},
            "error": "objective.reference: live swaps the starting adapter in",
        },
        {"yaml": "seq_cls", "task": "seq_cls", "error": "model.task seq_cls reads format classification"},
        {"yaml": "smoothing", "objective": {"name": "dpo", "label_smoothing": 0.1}, "error": "only the robust loss"},
    ],
    ids=lambda bits: bits["yaml"],
)
def test_impossible_combinations_are_refused_before_loading(tmp_path, tiny_model_dir, pair_file, recipe_bits):
    recipe = _recipe(tmp_path, tiny_model_dir, pair_file, objective=recipe_bits.get("objective"))
    if "format" in recipe_bits:
        recipe["data"]["train"]["format"] = recipe["data"]["validation"]["format"] = recipe_bits["format"]
    if "packing" in recipe_bits:
        recipe["data"]["packing"] = True
    if "launch" in recipe_bits:
        recipe["launch"] = recipe_bits["launch"]
    if "task" in recipe_bits:
        recipe["model"]["task"] = recipe_bits["task"]
    with pytest.raises(Exception, match=recipe_bits["error"]):
        validate_recipe_dict(recipe, "r.yaml")


@pytest.mark.parametrize(
    "method",
    [{"name": "ia3"}, {"name": "prompt_tuning"}, {"name": "loha", "r": 4, "alpha": 8, "target_modules": "all-linear"}],
    ids=lambda m: m["name"],
)
def test_dpo_trains_with_other_methods(tmp_path, tiny_model_dir, pair_file, method, one_torch_thread):
    summary = train(validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, pair_file, method), "r.yaml"))
    before, after = summary["eval_before"], summary["eval_after"]
    # Before the first step the policy is its own reference: every margin is 0, the loss is log 2, ties count half.
    assert before["eval_rewards/accuracy"] == 0.5 and abs(before["eval_loss"] - math.log(2)) < 1e-6
    assert after["eval_rewards/accuracy"] >= 0.75 and after["eval_rewards/margin"] > 0, after
    assert after["eval_loss"] < before["eval_loss"]


@pytest.mark.parametrize(
    "objective", [{"name": "orpo", "beta": 0.1}, {"name": "simpo", "beta": 2.0}], ids=["orpo", "simpo"]
)
def test_reference_free_objectives_train(tmp_path, tiny_model_dir, pair_file, objective, one_torch_thread):
    summary = train(validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, pair_file, objective=objective), "r.yaml"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_rewards/margin"] > before["eval_rewards/margin"]
    assert after["eval_rewards/accuracy"] >= 0.75 and after["eval_loss"] < before["eval_loss"]
    assert summary["objective"] == objective["name"]


def test_dpo_from_the_cli_logs_rewards_and_resumes_exactly(tmp_path, tiny_model_dir, pair_file):
    """A run stopped after its step-2 checkpoint and resumed ends with the unbroken run's adapter: the
    reference is the starting policy, not the adapter the checkpoint holds."""
    from safetensors.torch import load_file

    common = {"schedule": "constant", "save_every": 2, "eval_every": None}
    unbroken = write_recipe(tmp_path / "u.yaml", {**_recipe(tmp_path, tiny_model_dir, pair_file, max_steps=6, **common),
                                                    "output": {"dir": str(tmp_path / "unbroken")}})  # fmt: skip
    done = run_cli("train", str(unbroken))
    assert done.returncode == 0, done.stderr
    assert "reward accuracy 50.0% ->" in done.stdout + done.stderr, done.stderr
    records = [json.loads(line) for line in (tmp_path / "unbroken" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["type"] == "train")
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"} <= step.keys()

    broken = write_recipe(tmp_path / "b.yaml", _recipe(tmp_path, tiny_model_dir, pair_file, max_steps=4, **common))
    assert run_cli("train", str(broken)).returncode == 0
    resumed = run_cli("train", str(broken), "--set", "training.max_steps=6", "--resume")
    assert resumed.returncode == 0 and "(step 2 of 6)" in resumed.stdout + resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "unbroken" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_peft_objectives_lists_the_registry_and_one_objectives_options():
    listed = run_cli("objectives")
    assert listed.returncode == 0, listed.stderr
    for name in ("sft", "dpo", "orpo", "simpo"):
        assert f"\n {name} " in "\n" + listed.stdout, listed.stdout
    shown = run_cli("objectives", "dpo")
    assert shown.returncode == 0 and "label_smoothing" in shown.stdout and "sigmoid" in shown.stdout
    unknown = run_cli("objectives", "dpp")
    assert unknown.returncode == 2 and "unknown objective 'dpp' (did you mean 'dpo'?)" in unknown.stderr
