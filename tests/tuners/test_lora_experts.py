"""LoRA on the fused expert parameters of mixture-of-experts models (`target_parameters`): HF PEFT loads our
adapters and we load theirs with equal logits and gradients, merges (in memory, and streamed into the
checkpoint's per-expert tensors) equal the unmerged model, and bad recipes are refused with the key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from peftcli.errors import PeftCliError
from peftcli.examples.tiny import build_tokenizer
from peftcli.export.merge import merge_adapter_dir
from peftcli.models.experts import experts_left_out
from peftcli.tuners.adapter import apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from peftcli.tuners.registry import get_tuner

from support import make_recipe, run_cli, write_recipe

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128
)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, intermediate_size=48, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(SMALL, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40),
    ),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in made:
            import transformers

            config_class, model_class, kwargs = FAMILIES[family]
            tokenizer = build_tokenizer()
            torch.manual_seed(0)
            config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **kwargs)
            made[family] = tmp_path_factory.mktemp(family) / "model"
            getattr(transformers, model_class)(config).save_pretrained(made[family])
            tokenizer.save_pretrained(made[family])
        return made[family]

    return build


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = torch.randint(5, 390, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _params(**options):
    return get_tuner("lora").params(**{"r": 2, "target_modules": ["q_proj"], "target_parameters": EXPERTS, **options})


def _ours(base: Path, **options):
    model = _load(base)
    torch.manual_seed(0)
    info = apply_adapter(model, _params(**options))
    _perturb(model, 4)
    return model, info


def _scale(logits: torch.Tensor) -> float:
    return max(logits.abs().max().item(), 1.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_start_as_the_base_and_the_adapter_changes_them(family, moe_dir):
    base = moe_dir(family)
    model = _load(base)
    info = apply_adapter(model, _params())
    assert info.targeted_parameters == tuple(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    )
    experts = model.get_submodule("model.layers.0.mlp.experts")
    # HF PEFT's layout: r rows of A and r columns of B per expert; the first registered parameter innermost
    assert experts.parameter_name == "down_proj" and experts.base_layer.parameter_name == "gate_up_proj"
    assert experts.lora_A.weight.shape == (2 * 4, experts.in_features)
    torch.testing.assert_close(_logits(model), _logits(_load(base)), atol=0, rtol=0)  # B = 0: the base exactly
    assert experts_left_out(model, [*info.param_names, *info.targeted_parameters]) is None
    _perturb(model, 4)
    assert (_logits(model) - _logits(_load(base))).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_peft_loads_ours_with_equal_logits_and_gradients(family, moe_dir, tmp_path):
    from peft import PeftModel

    base = moe_dir(family)
    ours, info = _ours(base)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(base))
    theirs = PeftModel.from_pretrained(_load(base), tmp_path / "ours", is_trainable=True).eval()
    expected = _logits(ours)
    # fp32 and the same per-expert update; only the order of additions differs
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5 * _scale(expected), rtol=0)

    grads = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[name] = {
            n.removeprefix("base_model.model.").replace(".default", ""): p.grad
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    assert set(grads["ours"]) == set(grads["theirs"]) == set(info.param_names)
    for name, grad in grads["ours"].items():
        torch.testing.assert_close(grad, grads["theirs"][name], atol=1e-5 * grad.abs().max().item(), rtol=0)
    assert all(g.abs().max() > 0 for n, g in grads["ours"].items() if ".experts." in n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_we_load_hf_peft_adapters_on_experts(family, moe_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = moe_dir(family)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj"], target_parameters=list(reversed(EXPERTS)))
    theirs = get_peft_model(_load(base), config)
    _perturb(theirs, 9)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    mine = _load(base)
    info = load_adapter(mine, tmp_path / "theirs")
    assert len(info.targeted_parameters) == 4
    expected = _logits(theirs)
    torch.testing.assert_close(_logits(mine), expected, atol=1e-5 * _scale(expected), rtol=0)


def test_a_two_dimensional_parameter_is_one_expert(moe_dir, tmp_path):
    """target_parameters also takes a plain 2-D weight (the router), as HF PEFT does."""
    from peft import PeftModel

    base = moe_dir("mixtral")
    ours, info = _ours(base, target_modules=[], target_parameters=["mlp.gate.weight"])
    assert info.targeted == [] and len(info.targeted_parameters) == 2
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(base))
    theirs = PeftModel.from_pretrained(_load(base), tmp_path / "ours").eval()
    expected = _logits(ours)
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5 * _scale(expected), rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merges_equal_the_adapted_model(family, moe_dir, tmp_path):
    from safetensors import safe_open

    base = moe_dir(family)
    model, _ = _ours(base)
    expected = _logits(model)
    scale = _scale(expected)
    merge_adapter(model)
    # fp32: merged weights differ from base + update applied per forward by rounding only
    torch.testing.assert_close(_logits(model), expected, atol=1e-5 * scale, rtol=0)
    unmerge_adapter(model)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5 * scale, rtol=0)

    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(base))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)}}))
    result = merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    assert result.merged_modules == 2 + 4  # two q_proj layers, four expert parameters
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert written == set(f.keys())  # the checkpoint's own per-expert layout
    torch.testing.assert_close(_logits(_load(tmp_path / "merged")), expected, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout": 0.1}, "target_parameters needs dropout: 0"),
        ({"dora": True}, "target_parameters needs dora: false"),
        ({"init": "pissa"}, "target_parameters starts from init default or gaussian"),
        ({"target_parameters": ["experts.up_proj"]}, "experts.up_proj matched no parameter of this model; fused "
         "expert parameters: mlp.experts.down_proj, mlp.experts.gate_up_proj"),
        ({"target_parameters": ["input_layernorm.weight"]}, "is a 1-D torch.float32 tensor"),
        ({"target_parameters": ["q_proj.weight"]}, "belongs to model.layers.0.self_attn.q_proj, which target_modules"),
        ({"target_modules": [], "target_parameters": []}, "target_modules must name at least one module"),
    ],
)  # fmt: skip
def test_bad_recipes_are_refused_with_the_key(options, message, moe_dir):
    from pydantic import ValidationError

    with pytest.raises((PeftCliError, ValidationError), match=message):
        apply_adapter(_load(moe_dir("mixtral")), _params(**options))


def test_train_and_merge_from_the_cli(moe_dir, copy_data, tmp_path):
    """`peft train` adapts the experts (the plan says so, no left-out note), then `peft merge --verify` passes."""
    base = moe_dir("mixtral")
    recipe = make_recipe(
        tmp_path,
        base,
        copy_data,
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "target_parameters": EXPERTS},
        training={"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2},
    )
    done = run_cli("train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "and 4 expert parameters" in output
    assert "fused 3-D parameters" not in output
    run = tmp_path / "run"
    config = yaml.safe_load((run / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{i}.{p}" for i in (0, 1) for p in EXPERTS)
    merged = run_cli("merge", str(run), "--output", str(tmp_path / "merged"), "--dtype", "fp32", "--verify")
    assert merged.returncode == 0, merged.stdout + merged.stderr

    plain = make_recipe(tmp_path, base, copy_data, output={"dir": str(tmp_path / "plain")})
    plan = run_cli("targets", str(write_recipe(tmp_path / "plain.yaml", plain)))
    assert plan.returncode == 0, plan.stderr
    said = " ".join((plan.stdout + plan.stderr).split())
    assert "4 fused 3-D parameters (down_proj, gate_up_proj)" in said
    assert "target_parameters: [experts.down_proj, experts.gate_up_proj]" in said
