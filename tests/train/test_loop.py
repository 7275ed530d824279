"""The training loop on the tiny model: learning, frozen base, outputs, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peftcli.errors import PeftCliError
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import SilentReporter, train
from peftcli.train.run_dir import list_checkpoints

from support import make_recipe


def _recipe(tmp_path, tiny_model_dir, copy_data, **sections):
    return validate_recipe_dict(make_recipe(tmp_path, tiny_model_dir, copy_data, **sections), "test.yaml")


def test_loss_goes_down_on_the_toy_task(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        method={"r": 16, "alpha": 32},
        training={"max_steps": 40, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 2},
    )
    summary = train(recipe)
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 1.5, (before, after)
    assert summary["steps"] == 40
    assert 0 < summary["trainable_params"] < summary["total_params"] * 0.5


def test_only_adapter_tensors_are_saved_and_base_stays_frozen(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 3})
    train(recipe)
    out = tmp_path / "run"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    b_norm = sum(float(t.norm()) for k, t in tensors.items() if ".lora_B." in k)
    assert b_norm > 0  # B started at zero: training moved it


class _StopAfter(SilentReporter):
    """Simulates a crash: raises after the given step was logged."""

    def __init__(self, step: int):
        self.stop_step = step

    def step(self, metrics: dict) -> None:
        if metrics["step"] == self.stop_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    ("accumulation", "packing"), [(1, True), (2, True), (2, False)], ids=["packed", "packed-accum", "grouped"]
)
def test_resume_gives_the_same_adapter_as_an_unbroken_run(tmp_path, tiny_model_dir, copy_data, accumulation, packing):
    """Packed rows or length-grouped batches; the run crosses epoch boundaries (40 examples), as a resume may."""
    sections = dict(
        method={"dropout": 0.1},  # dropout draws random numbers: resume must draw the same ones
        data={
            "packing": packing,
            "validation": None,
            "train": {"path": str(copy_data), "format": "prompt_completion", "max_samples": 40},
        },
        training={
            "max_steps": 8,
            "batch_size": 4,
            "gradient_accumulation": accumulation,
            "save_every": 4,
            "learning_rate": 5e-3,
            "warmup_steps": 2,
        },
    )
    unbroken = _recipe(tmp_path / "a", tiny_model_dir, copy_data, **sections)
    train(unbroken)

    broken = _recipe(tmp_path / "b", tiny_model_dir, copy_data, **sections)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, reporter=_StopAfter(6))
    assert [step for step, _ in list_checkpoints(tmp_path / "b" / "run")] == [4]
    summary = train(broken, resume=True)
    assert summary["steps"] == 8

    a = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    # The resumed run's log holds each step once, the crashed steps 5-6 replaced by the resumed ones.
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, 9))
    losses_a = [
        json.loads(line)["loss"]
        for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "train"
    ]
    losses_b = [r["loss"] for r in records if r["type"] == "train"]
    assert losses_a == pytest.approx(losses_b, abs=1e-6)


def test_adalora_resume_keeps_its_importance_estimates(tmp_path, tiny_model_dir, copy_data, one_torch_thread):
    """A checkpoint in the middle of AdaLoRA's budgeting phase resumes to the same pruned adapter."""
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        training={"max_steps": 12, "batch_size": 4, "save_every": 6, "learning_rate": 3e-2, "seed": 5},
    )
    recipe["method"] = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 1}

    def run(directory: str):
        return validate_recipe_dict({**recipe, "output": {"dir": str(tmp_path / directory)}}, "test.yaml")

    train(run("a"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run("b"), reporter=_StopAfter(8))
    assert (tmp_path / "b" / "checkpoints" / "step-0000006" / "method_state.safetensors").is_file()
    train(run("b"), resume=True)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # the same triplets were pruned
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    config_a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config_a["rank_pattern"] == config_b["rank_pattern"]


def test_checkpoints_hold_only_the_adapter_and_are_pruned(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(
        tmp_path, tiny_model_dir, copy_data, training={"max_steps": 7, "save_every": 2, "keep_checkpoints": 2}
    )
    train(recipe)
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [step for step, _ in checkpoints] == [4, 6]
    weights = load_file(str(checkpoints[-1][1] / "model.safetensors"))
    assert weights and all("lora_" in k for k in weights)


def test_activation_checkpointing_trains_lora(tmp_path, tiny_model_dir, copy_data):
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 3, "activation_checkpointing": True})
    summary = train(recipe)
    tensors = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert sum(float(t.norm()) for k, t in tensors.items() if ".lora_B." in k) > 0
    assert math.isfinite(summary["final_train_loss"])


def test_activation_checkpointing_gives_the_gradients_of_a_plain_backward(tiny_model_dir):
    """Recomputing the blocks in the backward pass must not change a single adapter gradient (A and B, every
    layer), including those of the first block, which need the input-grad hook on the frozen embedding."""
    from transformers import AutoModelForCausalLM

    from peftcli.models.load import enable_activation_checkpointing
    from peftcli.tuners.adapter import apply_adapter
    from peftcli.tuners.lora.spec import LoraParams

    ids = torch.randint(5, 390, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        torch.manual_seed(0)
        info = apply_adapter(model, LoraParams(r=4, target_modules="all-linear"))
        with torch.no_grad():  # B starts at zero, which would leave A without gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        named = dict(model.named_parameters())
        grads.append({name: named[name].grad for name in info.param_names})
    plain, recomputed = grads
    assert set(plain) == set(recomputed) and all(g is not None and g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        # fp32, the same operations recomputed: equal up to a few roundings of the largest entry
        tolerance = 8 * torch.finfo(torch.float32).eps * grad.abs().max().item()
        torch.testing.assert_close(recomputed[name], grad, atol=tolerance, rtol=0, msg=name)


def test_compiled_layers_train_as_the_plain_ones(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    """training.compile: the same step losses and adapter. Inductor reorders fp32 sums (~1e-7 relative); in
    Adam's first steps an element whose gradient is near zero moves by up to the learning rate (3e-3) whatever
    its size, so such noise shows in the adapter at 1e-5..1e-4: 3e-4 is a tenth of one step's reach."""

    def losses(directory: str, compile_layers: bool) -> list[float]:
        recipe = _recipe(
            tmp_path / directory,
            tiny_model_dir,
            copy_data,
            data={"validation": None},
            training={"max_steps": 3, "compile": compile_layers, "eval_at_start": False},
        )
        train(recipe)
        records = (tmp_path / directory / "run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in records]

    # Dynamo's capture and AOT autograd, as inductor gets them, without its C++ code generation: what this
    # project adds is compiling the layers in place and training through them (inductor itself takes two
    # minutes to build on a fresh CI machine; bench/train_vs_hf.py --ours-compile true runs it).
    compile_layer = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_layer(self, backend="aot_eager"))
    plain, compiled = losses("plain", False), losses("compiled", True)
    assert compiled == pytest.approx(plain, rel=1e-5)
    a = load_file(str(tmp_path / "plain" / "run" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 3e-4, key


def _adapters_equal(a_dir, b_dir, atol: float = 1e-6) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


_SHORT = dict(
    data={"validation": None},
    training={"max_steps": 8, "batch_size": 4, "save_every": 2, "keep_checkpoints": 2, "eval_at_start": False},
)


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path, tiny_model_dir, copy_data):
    sections = {**_SHORT, "training": {**_SHORT["training"], "save_every": 4}}
    train(_recipe(tmp_path / "a", tiny_model_dir, copy_data, **sections))
    broken = _recipe(tmp_path / "b", tiny_model_dir, copy_data, **sections)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, reporter=_StopAfter(2))  # preempted before step 4's checkpoint
    assert list_checkpoints(tmp_path / "b" / "run") == []
    summary = train(broken, resume=True)
    assert summary["steps"] == 8
    _adapters_equal(tmp_path / "a" / "run", tmp_path / "b" / "run")
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the first attempt's steps were cleared with it


@pytest.mark.parametrize("damage", ["torn-state", "truncated-weights"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model_dir, copy_data, damage):
    train(_recipe(tmp_path / "a", tiny_model_dir, copy_data, **_SHORT))
    broken = _recipe(tmp_path / "b", tiny_model_dir, copy_data, **_SHORT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, reporter=_StopAfter(7))
    checkpoints = list_checkpoints(tmp_path / "b" / "run")
    assert [step for step, _ in checkpoints] == [4, 6]
    newest = checkpoints[-1][1]
    if damage == "torn-state":
        state = newest / "trainer_state.json"
        state.write_text(state.read_text()[:20])
    else:
        weights = next(newest.rglob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])

    messages = []

    class Recorder(SilentReporter):
        def message(self, text: str) -> None:
            messages.append(text)

    summary = train(broken, resume=True, reporter=Recorder())
    assert summary["steps"] == 8
    assert any(m.startswith(f"warning: checkpoint {newest} cannot be read") for m in messages), messages
    assert any("resuming from" in m and m.split()[2].endswith("step-0000004") for m in messages), messages
    _adapters_equal(tmp_path / "a" / "run", tmp_path / "b" / "run")


def test_no_readable_checkpoint_is_an_error_that_says_so(tmp_path, tiny_model_dir, copy_data):
    broken = _recipe(tmp_path, tiny_model_dir, copy_data, **_SHORT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, reporter=_StopAfter(3))
    for _, ckpt in list_checkpoints(tmp_path / "run"):
        (ckpt / "trainer_state.json").write_text("{")
    with pytest.raises(PeftCliError, match=r"no checkpoint can be read: step-0000002 \(JSONDecodeError"):
        train(broken, resume=True)


def test_resume_refuses_a_change_the_checkpoint_cannot_follow_and_allows_a_longer_run(
    tmp_path, tiny_model_dir, copy_data
):
    from peftcli.errors import OutputError

    sections = {**_SHORT, "training": {**_SHORT["training"], "max_steps": 4}}
    train(_recipe(tmp_path, tiny_model_dir, copy_data, **sections))
    for change in ({"method": {"r": 8}}, {"training": {**sections["training"], "learning_rate": 1e-3}}):
        changed = _recipe(tmp_path, tiny_model_dir, copy_data, **{**sections, **change})
        with pytest.raises(
            OutputError, match=r"--resume: the recipe differs .* in (method\.r|training\.learning_rate),"
        ):
            train(changed, resume=True)
    messages = []

    class Recorder(SilentReporter):
        def message(self, text: str) -> None:
            messages.append(text)

    longer = _recipe(
        tmp_path, tiny_model_dir, copy_data, **{**sections, "training": {**sections["training"], "max_steps": 6}}
    )
    assert train(longer, resume=True, reporter=Recorder())["steps"] == 6
    assert any("differs from the run's recipe.yaml in training.max_steps" in m for m in messages), messages


def test_eval_generation_with_every_token_trained_goes_on_without_a_score(tmp_path, tiny_model_dir, copy_data):
    """data.mask_prompt false trains from the first token: there is no prompt to answer, so the run says so."""

    class Messages(SilentReporter):
        def __init__(self):
            self.lines = []

        def message(self, text: str) -> None:
            self.lines.append(text)

    recipe = _recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        data={"mask_prompt": False},
        training={"max_steps": 2, "eval_generation": {"prompts": 2, "max_new_tokens": 4, "pattern": "a"}},
    )
    reporter = Messages()
    summary = train(recipe, reporter=reporter)
    assert summary["steps"] == 2 and math.isfinite(summary["eval_after"]["eval_loss"])
    assert "gen_score" not in summary["eval_after"]
    assert any("no generation score" in line for line in reporter.lines), reporter.lines
