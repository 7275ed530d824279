"""`objective.reference: precomputed`: the starting policy's log-probabilities computed once before the first
step give the run the live reference gives, are kept in the run directory and read back on resume, and are
what `auto` picks for methods that train base weights."""

from __future__ import annotations

import json

import pytest

from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import train

from support import make_recipe, run_cli, write_recipe


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    rows = copy_task(24, 5)
    root = tmp_path_factory.mktemp("prefs")
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % 24]["completion"]}
        for i, r in enumerate(rows)
    ]
    unpaired = [
        {"prompt": r["prompt"], "completion": r["completion"] if i % 2 else rows[(i + 3) % 24]["completion"],
         "label": bool(i % 2)}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    return {"dpo": write_jsonl(root / "pairs.jsonl", pairs), "kto": write_jsonl(root / "unpaired.jsonl", unpaired)}


def _recipe(tmp_path, model, data_files, objective, reference, out, method=None, **training):
    data = data_files[objective]
    fmt = "preference" if objective == "dpo" else "unpaired_preference"
    recipe = make_recipe(
        tmp_path,
        model,
        data,
        objective={"name": objective, "beta": 0.1, "reference": reference},
        data={"train": {"path": str(data), "format": fmt}, "validation": {"fraction": 0.25}, "max_length": 64},
        training={"max_steps": 5, "batch_size": 4, "learning_rate": 1e-2, "schedule": "constant", **training},
        output={"dir": str(tmp_path / out)},
    )
    if method is not None:
        recipe["method"] = method
    return recipe


def _steps(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] in ("train", "eval")]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_precomputed_reference_gives_the_live_references_run(
    tmp_path, tiny_model_dir, data_files, objective, one_torch_thread
):
    live = train(validate_recipe_dict(_recipe(tmp_path, tiny_model_dir, data_files, objective, "live", "live"), "l"))
    ahead = _recipe(tmp_path, tiny_model_dir, data_files, objective, "precomputed", "ahead")
    summary = train(validate_recipe_dict(ahead, "a.yaml"))
    assert (live["reference"], summary["reference"]) == ("live", "precomputed")
    assert (tmp_path / "ahead" / "reference_logps.safetensors").is_file()
    assert not (tmp_path / "live" / "reference_logps.safetensors").exists()
    one, two = _steps(tmp_path / "live"), _steps(tmp_path / "ahead")
    assert len(one) == len(two) > 5
    for a, b in zip(one, two, strict=True):  # the same fp32 sums, batched differently: 1e-5 relative
        for key in set(a) & set(b):
            compared = key.startswith(("loss", "eval_loss", "rewards/", "eval_rewards/", "kl", "eval_kl", "logps/"))
            if compared and a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a, b)
    # before the first step the policy is its reference; after it, the margins moved (the table is used)
    assert summary["eval_before"]["eval_rewards/margin"] == 0 != summary["eval_after"]["eval_rewards/margin"]


def test_methods_that_train_base_weights_get_a_precomputed_reference(tmp_path, tiny_model_dir, data_files):
    recipe = _recipe(tmp_path, tiny_model_dir, data_files, "dpo", "auto", "full", method={"name": "full"},
                     learning_rate=1e-3, max_steps=12)  # fmt: skip
    recipe["data"]["validation"] = dict(recipe["data"]["train"])  # the training pairs: were they learnt?
    summary = train(validate_recipe_dict(recipe, "full.yaml"))
    assert summary["reference"] == "precomputed"
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval_rewards/accuracy"] == 0.5 and after["eval_rewards/accuracy"] > 0.5, after


def test_a_resumed_run_reads_its_reference_back_and_ends_as_the_unbroken_one(tmp_path, tiny_model_dir, data_files):
    from safetensors.torch import load_file

    common = {"save_every": 2, "eval_at_start": False}
    unbroken = _recipe(tmp_path, tiny_model_dir, data_files, "dpo", "precomputed", "unbroken", max_steps=4, **common)
    assert run_cli("train", str(write_recipe(tmp_path / "u.yaml", unbroken))).returncode == 0
    broken = write_recipe(
        tmp_path / "b.yaml",
        _recipe(tmp_path, tiny_model_dir, data_files, "dpo", "precomputed", "run", max_steps=3, **common),
    )
    first = run_cli("train", str(broken))
    assert first.returncode == 0 and "computing the reference log-probabilities" in first.stdout + first.stderr
    resumed = run_cli("train", str(broken), "--set", "training.max_steps=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "computing the reference" not in resumed.stdout + resumed.stderr  # read back from the run directory
    a = load_file(str(tmp_path / "unbroken" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_live_reference_under_sharded_parameters_is_refused(tmp_path, tiny_model_dir, data_files):
    recipe = _recipe(tmp_path, tiny_model_dir, data_files, "dpo", "live", "r")
    recipe["launch"] = {"preset": "zero3", "nproc": 2}
    with pytest.raises(Exception, match="objective.reference: live swaps the starting adapter in .* set precomputed"):
        validate_recipe_dict(recipe, "r.yaml")
    recipe["objective"]["reference"] = "auto"
    assert validate_recipe_dict(recipe, "r.yaml").reference_mode() == "precomputed"
