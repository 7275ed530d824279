"""LoRA on the tiny Llama: identity at start, only the adapter trains, save/load, merge, and load-time checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from peftcli.errors import AdapterError
from peftcli.examples.tiny import build_llama
from peftcli.tuners.adapter import (
    WEIGHTS_NAME,
    adapter_info,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.lora.layers import LoraLinear
from peftcli.tuners.lora.spec import LoraParams

from support import logits


def randomize_lora_b(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero lora_B everywhere, so the adapter is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> list[float]:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_identity_at_init(load_base, input_ids, init):
    base = load_base()
    expected = logits(base, input_ids)
    model = load_base()
    info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules="all-linear", init=init))
    layers = lora_layers(model)
    assert len(layers) == len(info.targeted) == 14
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_A.weight) > 0  # A is random, B is what keeps it the identity
        assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.equal(logits(model, input_ids), expected)


def test_gaussian_and_default_init_differ():
    base = nn.Linear(64, 32)
    torch.manual_seed(0)
    default = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, init="default").lora_A.weight
    torch.manual_seed(0)
    gaussian = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, init="gaussian").lora_A.weight
    assert not torch.equal(default, gaussian)
    assert default.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming-uniform(a=sqrt(5)) bound is 1/sqrt(in)
    assert gaussian.std().item() == pytest.approx(1 / 4, rel=0.2)  # std 1/r, as HF PEFT


@pytest.mark.parametrize(
    ("target", "expected_count"), [(["q_proj", "v_proj"], 4), (r".*\.mlp\..*", 6), ("all-linear", 14)]
)
def test_only_adapter_params_require_grad(load_base, target, expected_count):
    model = load_base()
    r = 4
    info = apply_adapter(model, LoraParams(r=r, alpha=8, target_modules=target))
    assert len(info.targeted) == expected_count
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(info.param_names)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # each targeted layer's base weight kept its place under base_layer, frozen
    for name in info.targeted:
        base_weight = model.get_submodule(name).base_layer.weight
        assert not base_weight.requires_grad
        assert f"{name}.base_layer.weight" not in info.param_names
    expected = sum(
        r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in info.targeted
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert info.trainable_count(model) == expected


def test_applying_twice_is_refused(load_base):
    model = load_base()
    apply_adapter(model, LoraParams(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="already"):
        apply_adapter(model, LoraParams(target_modules=["v_proj"]))


def test_training_changes_only_the_adapter(load_base, input_ids):
    model = load_base()
    info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules="all-linear"))
    adapter = set(info.param_names)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapter}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in adapter}
    assert len(base_before) == 21  # every parameter of the base model, none counted twice

    losses = train_steps(model, input_ids, steps=3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]

    named = dict(model.named_parameters())
    for name, before in base_before.items():
        assert torch.equal(named[name], before), f"base parameter {name} changed"
    b_names = [n for n in adapter if ".lora_B." in n]
    assert len(b_names) == 14
    for name in b_names:
        assert torch.isfinite(named[name]).all()
        assert not torch.equal(named[name], lora_before[name]), f"{name} did not train"
        assert torch.count_nonzero(named[name]) > 0


@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_save_load_roundtrip(load_base, input_ids, tmp_path, modules_to_save):
    model = load_base()
    info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules="all-linear", modules_to_save=modules_to_save))
    head_before = model.lm_head.weight.detach().clone()
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, logits(load_base(), input_ids), atol=1e-4)  # the adapter does something

    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    saved = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert set(saved) == {"base_model.model." + n for n in info.param_names}
    assert not any("base_layer" in k for k in saved)
    if modules_to_save:
        assert model.lm_head.weight.requires_grad
        assert not torch.equal(model.lm_head.weight, head_before)  # the head trained in full
        assert torch.equal(saved["base_model.model.lm_head.weight"], model.lm_head.weight.detach())
    else:
        assert torch.equal(model.lm_head.weight, head_before)

    fresh = load_base()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.targeted == info.targeted
    assert sorted(loaded.param_names) == sorted(info.param_names)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference
    torch.testing.assert_close(logits(fresh, input_ids), expected, atol=1e-6, rtol=0)


def merged_logit_tolerance(model: nn.Module, reference: torch.Tensor) -> float:
    """How far fp32 logits may move when the LoRA delta is folded into the weights.

    Folding rounds each weight once; a dot product over n such weights moves by about sqrt(n) ulps of its
    size, and each adapted block adds its share. Both paths round, hence the factor 2.
    """
    fan_in = max(layer.base_layer.in_features for layer in lora_layers(model).values())
    blocks = model.config.num_hidden_layers
    return 2 * blocks * math.sqrt(fan_in) * torch.finfo(torch.float32).eps * reference.abs().max().item()


def test_merge_unmerge(load_base, input_ids):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_b(model)
    layers = lora_layers(model)
    base_weights = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    unmerged = logits(model, input_ids)
    atol = merged_logit_tolerance(model, unmerged)  # 3.4e-5 here (measured: up to 1.05e-5)
    assert not torch.allclose(unmerged, logits(load_base(), input_ids), atol=1e-3)

    merge_adapter(model)
    merged_weights = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    for name, layer in layers.items():
        assert layer.merged
        delta = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(merged_weights[name] - base_weights[name], delta.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=atol, rtol=0)

    merge_adapter(model)  # a second merge must not add the delta again
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, merged_weights[name])
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=atol, rtol=0)

    unmerge_adapter(model)
    for name, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight.detach(), base_weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=atol, rtol=0)
    unmerge_adapter(model)  # a second unmerge is a no-op too
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight.detach(), base_weights[name], atol=1e-6, rtol=0)


def test_merged_weight_does_not_track_gradients(load_base):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_lora_b(model)
    merge_adapter(model)
    for layer in lora_layers(model).values():
        assert not layer.base_layer.weight.requires_grad
        assert layer.base_layer.weight.grad_fn is None


def _saved_adapter(load_base, tmp_path, **params):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, **params))
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    return tmp_path / "adapter"


def test_load_onto_wrong_shape_is_refused(load_base, tmp_path):
    adapter_dir = _saved_adapter(load_base, tmp_path, target_modules=["q_proj", "v_proj"])
    vocab = load_base().config.vocab_size
    other = build_llama(vocab, hidden_size=32, intermediate_size=64).eval()
    with pytest.raises(AdapterError, match="shape") as err:
        load_adapter(other, adapter_dir)
    assert "wrong base model" in str(err.value)


@pytest.mark.parametrize(("change", "word"), [("drop", "missing"), ("add", "unexpected")])
def test_load_with_missing_or_unexpected_key_is_refused(load_base, tmp_path, change, word):
    adapter_dir = _saved_adapter(load_base, tmp_path, target_modules=["q_proj", "v_proj"])
    path = adapter_dir / WEIGHTS_NAME
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert key in tensors
    if change == "drop":
        del tensors[key]
    else:
        tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = tensors[key].clone()
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=word) as err:
        load_adapter(load_base(), adapter_dir)
    assert "layers.1.self_attn" in str(err.value)


def test_load_without_config_is_refused(tmp_path, load_base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(load_base(), tmp_path / "empty")


@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (16, 8), (1, 3)])
def test_rslora_scaling(r, alpha):
    base = nn.Linear(16, 8)
    plain = LoraLinear(base, r=r, alpha=alpha, dropout=0.0, rslora=False, init="default")
    stable = LoraLinear(base, r=r, alpha=alpha, dropout=0.0, rslora=True, init="default")
    assert plain.scaling == pytest.approx(alpha / r)
    assert stable.scaling == pytest.approx(alpha / math.sqrt(r))
    # the forward uses the scaling: same A and B, branch output ratio sqrt(r)
    with torch.no_grad():
        stable.lora_A.weight.copy_(plain.lora_A.weight)
        plain.lora_B.weight.normal_()
        stable.lora_B.weight.copy_(plain.lora_B.weight)
        x = torch.randn(3, 16)
        plain_delta = plain(x) - base(x)
        stable_delta = stable(x) - base(x)
    assert plain_delta.abs().max() > 1e-3
    torch.testing.assert_close(stable_delta, plain_delta * math.sqrt(r), atol=1e-5, rtol=1e-5)


def test_rslora_params_reach_the_layers(load_base):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, rslora=True, target_modules=["q_proj"]))
    assert [m.scaling for m in lora_layers(model).values()] == [pytest.approx(4.0)] * 2


def test_dropout_only_in_training(load_base, input_ids):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, dropout=0.5, target_modules="all-linear"))
    randomize_lora_b(model)
    model.eval()
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))
    model.train()
    torch.manual_seed(0)
    first = logits(model, input_ids)
    second = logits(model, input_ids)
    assert not torch.allclose(first, second)
    assert adapter_info(model).params.dropout == 0.5


def test_adapter_layers_follow_the_models_mode(load_base, input_ids, tmp_path):
    # A base in eval mode must give an adapter in eval mode: dropout off, so two passes agree exactly.
    trained = load_base()
    apply_adapter(trained, LoraParams(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    for module in trained.modules():
        if isinstance(module, LoraLinear):
            nn.init.normal_(module.lora_B.weight)
    save_adapter(trained, tmp_path, base_model_name_or_path=None)

    model = load_base()
    assert not model.training
    load_adapter(model, tmp_path)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        first, second = model(input_ids).logits, model(input_ids).logits
    assert torch.equal(first, second)

    training_model = load_base().train()
    apply_adapter(training_model, LoraParams(r=4, alpha=8, dropout=0.5))
    assert all(m.training for m in training_model.modules())


def test_layer_exposes_the_base_layer_and_merges_with_a_bias():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)  # with a bias, unlike the tiny Llama's projections
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, init="default")
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert "r=4" in repr(layer) and "variant=lora" in repr(layer)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    expected = F.linear(x, base.weight + layer.lora_B.weight @ layer.lora_A.weight * 2, base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.bias, base.bias)  # the bias is left alone
