"""`model.adapter`: a run that starts from a trained adapter (SFT, then DPO) continues its tensors, compares
against it as the starting policy, records the chain, and refuses a method that does not describe it."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import train

from support import make_recipe, run_cli, write_recipe


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    rows = copy_task(16, 3)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % 16]["completion"]}
        for i, r in enumerate(rows)
    ]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pairs)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir, pair_file):
    """A finished SFT run on the chosen answers (prompt -> chosen)."""
    root = tmp_path_factory.mktemp("sft")
    recipe = make_recipe(root, tiny_model_dir, pair_file, output={"dir": str(root / "sft")})
    recipe["data"]["train"]["columns"] = {"completion": "chosen"}
    recipe["training"].update(max_steps=6, learning_rate=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread
    try:
        train(validate_recipe_dict(recipe, "sft.yaml"))
    finally:
        torch.set_num_threads(threads)
    return root / "sft"


def _dpo(tmp_path, model_dir, pairs, start, name="dpo", **training) -> dict:
    recipe = make_recipe(
        tmp_path,
        model_dir,
        pairs,
        model={"name_or_path": str(model_dir), "dtype": "fp32", "adapter": str(start)},
        objective={"name": "dpo", "beta": 0.1},
        data={
            "train": {"path": str(pairs), "format": "preference"},
            "validation": {"path": str(pairs), "format": "preference"},
            "max_length": 64,
        },
        training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, **training},
        output={"dir": str(tmp_path / name)},
    )
    return recipe


def _policy_logps(model, tokenizer, pairs) -> float:
    """Mean summed completion log-probability of the chosen answers under `model` (an oracle computation)."""
    total = 0.0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        whole = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}],
            tokenize=False,
        )
        ids = tokenizer(whole, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
        logps = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        total += float(logps[start - 1 :].sum())
    return total / len(rows)


def test_dpo_from_an_sft_adapter_starts_at_its_policy_and_compares_against_it(
    tmp_path, tiny_model_dir, pair_file, sft_run, one_torch_thread
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train(validate_recipe_dict(_dpo(tmp_path, tiny_model_dir, pair_file, sft_run), "dpo.yaml"))
    before, after = summary["eval_before"], summary["eval_after"]
    # The reference is the SFT adapter, not the bare base: before the first step every margin is exactly 0.
    assert before["eval_rewards/margin"] == 0 and before["eval_rewards/accuracy"] == 0.5, before
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    bare = _policy_logps(base, tokenizer, pair_file)
    sft = _policy_logps(PeftModel.from_pretrained(base, str(sft_run)).eval(), tokenizer, pair_file)
    # The policy at step 0 is the SFT run's, as HF PEFT computes it (fp32 sums of about -10: 1e-4 relative).
    assert abs(before["eval_logps/chosen"] - sft) < 1e-4 * abs(sft), (before["eval_logps/chosen"], sft, bare)
    assert abs(sft - bare) > 0.1  # the SFT adapter moved the policy, so the check above can fail
    assert after["eval_rewards/accuracy"] > 0.5 and after["eval_rewards/margin"] > 0, after

    weights = (sft_run / "adapter_model.safetensors").read_bytes()
    (start,) = summary["start_chain"]
    assert start["method"] == "lora" and start["objective"] == "sft"
    assert start["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert start["adapter"] == str(sft_run.resolve())
    saved = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert saved["start_chain"] == summary["start_chain"]

    # A run that starts from the DPO run carries the whole chain: sft, then dpo.
    again = _dpo(tmp_path, tiny_model_dir, pair_file, tmp_path / "dpo", name="again", max_steps=1)
    again["training"]["eval_at_start"] = False
    chain = train(validate_recipe_dict(again, "again.yaml"))["start_chain"]
    assert [(c["objective"], c["adapter"]) for c in chain] == [
        ("sft", str(sft_run.resolve())),
        ("dpo", str((tmp_path / "dpo").resolve())),
    ]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"method": {"name": "ia3"}}, "method.name: model.adapter .* is a lora adapter .*peft merge"),
        ({"method": {"name": "lora", "r": 8, "alpha": 8, "target_modules": "all-linear"}},
         "method.r: 8, but model.adapter .* was trained with 4; set 4"),
        ({"method": {"name": "lora", "r": 4, "alpha": 16, "target_modules": "all-linear"}},
         "method.alpha: 16"),
        ({"launch": {"preset": "zero3", "nproc": 2}, "objective": {"name": "sft"}}, "model.adapter: under ZeRO-3"),
    ],
    ids=["other method", "other rank", "other alpha", "zero3"],
)  # fmt: skip
def test_a_method_that_does_not_describe_the_adapter_is_refused(
    tmp_path, tiny_model_dir, pair_file, sft_run, change, error
):
    recipe = _dpo(tmp_path, tiny_model_dir, pair_file, sft_run)
    recipe.update(change)
    if change.get("objective", {}).get("name") == "sft":
        recipe["data"]["train"] = {"path": str(pair_file), "format": "prompt_completion",
                                   "columns": {"completion": "chosen"}}  # fmt: skip
        recipe["data"]["validation"] = {"fraction": 0.1}
    with pytest.raises(Exception, match=error):
        validate_recipe_dict(recipe, "r.yaml")
    # dropout only acts in training: a different one is allowed
    allowed = _dpo(tmp_path, tiny_model_dir, pair_file, sft_run)
    allowed["method"] = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.2}
    validate_recipe_dict(allowed, "r.yaml")


def test_the_starting_adapter_is_checked_from_the_cli(tmp_path, tiny_model_dir, pair_file, sft_run):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-2").mkdir(parents=True)
    recipe = _dpo(tmp_path, tiny_model_dir, pair_file, unfinished)
    refused = run_cli("train", str(write_recipe(tmp_path / "u.yaml", recipe)), "--dry-run")
    assert refused.returncode == 2 and "unfinished run" in refused.stderr and "--resume" in refused.stderr
    # Targets are compared when the weights load: a run adapting fewer modules is one line, exit 2.
    recipe = _dpo(tmp_path, tiny_model_dir, pair_file, sft_run)
    recipe["method"]["target_modules"] = ["q_proj", "v_proj"]
    refused = run_cli("train", str(write_recipe(tmp_path / "t.yaml", recipe)))
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.adapter: ") and "method.target_modules" in line, refused.stderr
    assert not (tmp_path / "dpo" / "adapter_model.safetensors").exists()
