"""IA3: defaults per architecture, feed-forward semantics and checks, merge, save/load and HF PEFT interop."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from peftcli.errors import PeftCliError
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.ia3.layers import IA3Layer
from peftcli.tuners.ia3.spec import SPEC, IA3Params, is_feedforward
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner, tuner_for_peft_type

from support import logits, max_diff, perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Layer)}


@pytest.fixture
def load_bert(tiny_bert_dir):
    return lambda: AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()


@pytest.fixture
def load_t5(tiny_t5_dir):
    return lambda: AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir, dtype=torch.float32).eval()


def t5_inputs(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


# --- registry and recipe-level rules -----------------------------------------------------------------------------


def test_registered_with_honest_capabilities():
    spec = get_tuner("ia3")
    assert spec is SPEC and spec.in_hf_peft and spec.peft_type == "IA3"
    assert tuner_for_peft_type("IA3") is spec
    caps = spec.capabilities
    assert caps.kind == "wraps_layers" and caps.mergeable and caps.quantized_base
    assert set(caps.layer_types) == {"Linear", "Conv2d"}
    assert set(caps.task_types) == {"causal_lm", "seq_cls", "token_cls", "seq2seq"}


def test_params_defaults_and_descriptions():
    params = IA3Params()
    assert (params.target_modules, params.feedforward_modules, params.init) == (None, None, "ones")
    for name, field in IA3Params.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]), "subset"),
        (dict(target_modules=[]), "at least one"),
        (dict(target_modules="  "), "empty"),
        (dict(feedforward_modules=" "), "empty"),
        (dict(exclude_modules=[]), "at least one"),
        (dict(init="zeros"), "init"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    ],
)
def test_recipe_rules(kwargs, word):
    with pytest.raises(ValidationError, match=word):
        IA3Params(**kwargs)


def test_feedforward_subset_of_target_lists_is_accepted():
    params = IA3Params(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert params.feedforward_modules == ["down_proj"]
    assert IA3Params(target_modules=["k_proj"], feedforward_modules=[]).feedforward_modules == []


def test_feedforward_matching_follows_hf_peft():
    # Plain-text suffix for list entries (HF PEFT's rule), full match for a regex.
    assert is_feedforward("model.layers.0.mlp.down_proj", ["down_proj"])
    assert is_feedforward("bert.encoder.layer.0.attention.output.dense", ["output.dense"])
    assert is_feedforward("model.layers.0.mlp.gate_up_proj", ["up_proj"])
    assert not is_feedforward("model.layers.0.mlp.up_proj", ["down_proj"])
    assert is_feedforward("model.layers.1.mlp.down_proj", r".*\.1\.mlp\.down_proj")
    assert not is_feedforward("model.layers.1.mlp.down_proj", r"down_proj")


# --- applying: defaults, feed-forward checks ---------------------------------------------------------------------


def test_llama_defaults_identity_and_shapes(load_base, input_ids):
    expected = logits(load_base(), input_ids=input_ids)
    model = load_base()
    info = apply_adapter(model, IA3Params())
    assert [n.rsplit(".", 1)[-1] for n in info.targeted] == ["k_proj", "v_proj", "down_proj"] * 2
    layers = ia3_layers(model)
    for name, layer in layers.items():
        base = layer.base_layer
        assert layer.feedforward == name.endswith("down_proj")
        shape = (1, base.in_features) if layer.feedforward else (base.out_features, 1)
        assert tuple(layer.ia3_l.shape) == shape and layer.ia3_l.dtype == torch.float32
        assert torch.equal(layer.ia3_l, torch.ones(shape))
    assert info.param_names == [f"{n}.ia3_l" for n in info.targeted]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == info.param_names
    assert torch.equal(logits(model, input_ids=input_ids), expected)
    assert info.config_extra == {
        "feedforward_modules": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    }


def test_random_init_is_not_identity(load_base, input_ids):
    torch.manual_seed(0)
    model = load_base()
    apply_adapter(model, IA3Params(init="random"))
    assert max_diff(logits(model, input_ids=input_ids), logits(load_base(), input_ids=input_ids)) > 1e-3


def test_explicit_targets_take_the_architecture_feedforward_default(load_base):
    model = load_base()
    apply_adapter(model, IA3Params(target_modules=["q_proj", "down_proj"]))
    assert {n: m.feedforward for n, m in ia3_layers(model).items() if n.startswith("model.layers.0")} == {
        "model.layers.0.self_attn.q_proj": False,
        "model.layers.0.mlp.down_proj": True,
    }
    model = load_base()
    apply_adapter(model, IA3Params(target_modules=["q_proj", "down_proj"], feedforward_modules=[]))
    assert not any(m.feedforward for m in ia3_layers(model).values())


def test_regex_targets_and_feedforward(load_base):
    model = load_base()
    info = apply_adapter(
        model, IA3Params(target_modules=r".*\.(v_proj|up_proj)", feedforward_modules=r".*layers\.1\.mlp\.up_proj")
    )
    assert len(info.targeted) == 4
    assert [n for n, m in ia3_layers(model).items() if m.feedforward] == ["model.layers.1.mlp.up_proj"]


def test_all_linear_skips_the_lm_head(load_base):
    model = load_base()
    info = apply_adapter(model, IA3Params(target_modules="all-linear", feedforward_modules=["down_proj"]))
    assert len(info.targeted) == 14 and "lm_head" not in info.targeted


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        # regex targets: checked on the model
        (dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=["up_proj"]), "up_proj matches none"),
        (dict(target_modules=r".*layers\.0\..*down_proj", feedforward_modules=["down_proj"]), "not in target_modules"),
        # default targets with an explicit feedforward list
        (dict(feedforward_modules=["gate_proj"]), "subset"),
        (dict(target_modules="all-linear", feedforward_modules=r".*nothing.*"), "matches none"),
    ],
)
def test_feedforward_outside_targets_is_refused_on_the_model(load_base, kwargs, word):
    with pytest.raises(PeftCliError, match=word) as err:
        apply_adapter(load_base(), IA3Params(**kwargs))
    assert str(err.value).startswith("method.feedforward_modules:")


def test_excluded_feedforward_modules_do_not_count_against_the_subset_rule(load_base):
    model = load_base()
    info = apply_adapter(
        model,
        IA3Params(
            target_modules=r".*\.(k_proj|down_proj)",
            feedforward_modules=["down_proj"],
            exclude_modules=["layers.0.mlp.down_proj"],
        ),
    )
    assert "model.layers.0.mlp.down_proj" not in info.targeted
    assert info.config_extra["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]


def test_unknown_architecture_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PeftCliError, match=r"^method\.target_modules: .*no default targets") as err:
        apply_adapter(model, IA3Params())
    assert "candidates: 0, 2" in str(err.value)
    info = apply_adapter(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), IA3Params(target_modules=["0", "1"]))
    assert info.targeted == ["0", "1"]


def test_unknown_target_names_the_candidates(load_base):
    with pytest.raises(PeftCliError, match="method.target_modules: kk_proj matched nothing"):
        apply_adapter(load_base(), IA3Params(target_modules=["kk_proj"]))
    with pytest.raises(PeftCliError, match="not a layer ia3 can wrap"):
        apply_adapter(load_base(), IA3Params(target_modules=["input_layernorm"]))


def test_bert_and_t5_defaults(load_bert, load_t5, tiny_bert_token_dir):
    model = load_bert()
    info = apply_adapter(model, IA3Params(), AdapterContext(task="seq_cls"))
    assert {n.split("layer.0.", 1)[-1] for n in info.targeted if ".layer.0." in n} == {
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "output.dense",
    }
    # HF PEFT's rule: every targeted name ending in "output.dense" is feed-forward, attention output included.
    assert sorted(n for n, m in ia3_layers(model).items() if m.feedforward) == sorted(
        n for n in info.targeted if n.endswith("output.dense")
    )
    assert {"classifier.weight", "classifier.bias"} <= set(info.param_names)

    token = AutoModelForTokenClassification.from_pretrained(tiny_bert_token_dir)
    assert len(apply_adapter(token, IA3Params(), AdapterContext(task="token_cls")).targeted) == 8

    t5 = load_t5()
    info = apply_adapter(t5, IA3Params(), AdapterContext(task="seq2seq"))
    assert {n.rsplit(".", 1)[-1] for n in info.targeted} == {"k", "v", "wo"}
    assert all(m.feedforward == n.endswith(".wo") for n, m in ia3_layers(t5).items())


# --- the layer: maths, merge, dtypes ------------------------------------------------------------------------------


def test_linear_output_and_input_scaling():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    out_layer = IA3Layer(base, feedforward=False)
    in_layer = IA3Layer(base, feedforward=True)
    with torch.no_grad():
        out_layer.ia3_l.copy_(torch.randn(4, 1))
        in_layer.ia3_l.copy_(torch.randn(1, 6))
    assert torch.allclose(out_layer(x), base(x) * out_layer.ia3_l.flatten())
    assert torch.allclose(in_layer(x), base(x * in_layer.ia3_l.flatten()))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("feedforward", [False, True])
def test_conv2d_scaling_and_merge(groups, feedforward):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, groups=groups, padding=1)
    original = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Layer(base, feedforward=feedforward)
    assert tuple(layer.ia3_l.shape) == (1, 4 if feedforward else 6, 1, 1)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.rand(layer.ia3_l.shape) + 0.5)
        expected = base(x * layer.ia3_l) if feedforward else base(x) * layer.ia3_l
        assert torch.allclose(layer(x), expected, atol=1e-6)
        layer.merge()
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert torch.equal(base.bias, original[1]) == feedforward  # only output scaling touches the bias
        layer.unmerge()
    assert torch.allclose(base.weight, original[0], atol=1e-6) and torch.allclose(base.bias, original[1], atol=1e-6)


def test_conv2d_targets_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    info = apply_adapter(model, IA3Params(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert info.targeted == ["0", "2"]
    assert [m.feedforward for m in ia3_layers(model).values()] == [False, True]
    with pytest.raises(PeftCliError, match="matched no Linear"):
        apply_adapter(nn.Sequential(nn.Conv2d(3, 4, 3)), IA3Params(target_modules="all-linear"))


def test_merge_unmerge_on_bert_with_biases(load_bert):
    ids = torch.randint(5, 400, (2, 10), generator=torch.Generator().manual_seed(3))
    model = load_bert()
    with torch.no_grad():  # the tiny BERT starts with zero biases, which scaling leaves unchanged
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    apply_adapter(model, IA3Params(), AdapterContext(task="seq_cls"))
    perturb(model, scale=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    assert any(n.endswith("base_layer.bias") for n in before)
    unmerged = logits(model, input_ids=ids)
    merge_adapter(model)
    once = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    # output scaling changes the bias too; input scaling leaves it alone
    assert not torch.equal(once["bert.encoder.layer.0.attention.self.key.base_layer.bias"],
                           before["bert.encoder.layer.0.attention.self.key.base_layer.bias"])  # fmt: skip
    assert torch.equal(once["bert.encoder.layer.0.output.dense.base_layer.bias"],
                       before["bert.encoder.layer.0.output.dense.base_layer.bias"])  # fmt: skip
    assert max_diff(logits(model, input_ids=ids), unmerged) < 1e-4
    merge_adapter(model)  # idempotent
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters() if "base_layer" in n)
    unmerge_adapter(model)
    unmerge_adapter(model)
    for name, param in model.named_parameters():
        if "base_layer" in name:
            assert torch.allclose(param, before[name], atol=1e-5), name
    assert max_diff(logits(model, input_ids=ids), unmerged) < 1e-4


def test_near_zero_vector_entries_unmerge_exactly():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    original = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Layer(base, feedforward=False)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.tensor([[0.0], [1e-9], [2.0]]))
    layer.merge()
    assert torch.count_nonzero(base.weight[0]) == 0  # the channel is wiped out of the merged weight
    layer.unmerge()
    assert torch.equal(base.weight, original[0]) and torch.equal(base.bias, original[1])
    assert layer._original is None


def test_half_precision_base_keeps_fp32_vectors(load_base, input_ids):
    model = load_base().to(torch.bfloat16)
    apply_adapter(model, IA3Params())
    perturb(model, scale=0.2)
    layer = next(iter(ia3_layers(model).values()))
    assert layer.ia3_l.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    out = logits(model, input_ids=input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    merge_adapter(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    merged = logits(model, input_ids=input_ids).float()
    assert max_diff(merged, out.float()) < 0.05 * out.float().abs().max().item()  # bf16 rounding only


def test_training_updates_only_the_vectors(load_base, input_ids):
    model = load_base()
    info = apply_adapter(model, IA3Params())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    named = dict(model.named_parameters())
    assert all(not torch.equal(named[n], torch.ones_like(named[n])) for n in info.param_names)
    assert all(torch.equal(named[n], v) for n, v in frozen.items())


# --- save / load -------------------------------------------------------------------------------------------------


def test_save_load_round_trip(load_base, input_ids, tiny_model_dir, tmp_path):
    model = load_base()
    info = apply_adapter(model, IA3Params(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"]))
    perturb(model, scale=0.2)
    expected = logits(model, input_ids=input_ids)
    save_adapter(model, tmp_path / "a", str(tiny_model_dir))
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert set(saved) == {f"base_model.model.{n}" for n in info.param_names}
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is False and config["init_ia3_weights"] is True
    assert config["feedforward_modules"] == ["up_proj"] and config["target_modules"] == ["k_proj", "up_proj"]
    assert len(info.targeted) == 4

    fresh = load_base()
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.targeted == info.targeted
    feedforward = [n for n, m in ia3_layers(fresh).items() if m.feedforward]
    assert feedforward == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(logits(fresh, input_ids=input_ids), expected)


def test_hf_config_mapping():
    from_hf = SPEC.from_hf_config
    params = from_hf({"peft_type": "IA3", "target_modules": ["k", "wo"], "feedforward_modules": ["wo"],
                      "init_ia3_weights": False, "modules_to_save": None, "task_type": "SEQ_2_SEQ_LM"})  # fmt: skip
    assert (params.target_modules, params.feedforward_modules, params.init) == (["k", "wo"], ["wo"], "random")
    # fan_in_fan_out follows from the layer type (Conv1D), as HF PEFT corrects it: the flag itself changes nothing
    assert from_hf({"peft_type": "IA3", "target_modules": ["c_attn"], "fan_in_fan_out": True}).target_modules == [
        "c_attn"
    ]
    # HF PEFT writes 'all-linear' out as full names but keeps short feed-forward names: same rule, as a regex.
    params = from_hf({"peft_type": "IA3", "target_modules": ["a.k", "a.wo"], "feedforward_modules": ["wo", "x.y"]})
    assert params.feedforward_modules == r".*(?:wo|x\.y)"
    assert is_feedforward("a.wo", params.feedforward_modules) and not is_feedforward("a.k", params.feedforward_modules)
    config = SPEC.to_hf_config(IA3Params(feedforward_modules=["down_proj"]), ["a.k_proj", "a.down_proj"])
    assert config["feedforward_modules"] == ["a.down_proj"] and config["target_modules"] == ["a.down_proj", "a.k_proj"]


# --- HF PEFT interop ---------------------------------------------------------------------------------------------

CASES = {
    "llama-defaults": ("llama", {}),
    "llama-regex": ("llama", dict(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj")),
    "llama-all-linear": ("llama", dict(target_modules="all-linear", feedforward_modules=["down_proj", "o_proj"])),
    "bert-seq-cls": ("bert", {}),
    "t5-seq2seq": ("t5", {}),
}


@pytest.fixture
def loaders(load_base, load_bert, load_t5, input_ids):
    ids = input_ids.clamp(min=5)
    return {
        "llama": (load_base, {"input_ids": ids}, "causal_lm"),
        "bert": (load_bert, {"input_ids": ids}, "seq_cls"),
        "t5": (load_t5, t5_inputs(ids), "seq2seq"),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_hf_peft(loaders, tmp_path, case):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model_state_dict

    arch, params = CASES[case]
    load, inputs, task = loaders[arch]
    model = load()
    info = apply_adapter(model, IA3Params(**params), AdapterContext(task=task))
    perturb(model, scale=0.2)
    ours = logits(model, **inputs)
    assert max_diff(ours, logits(load(), **inputs)) > 1e-3
    save_adapter(model, tmp_path / "a", None)
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = PeftModel.from_pretrained(load(), str(tmp_path / "a")).eval()
    from peft.tuners.ia3 import IA3Layer as HFLayer

    hf_layers = {n: m for n, m in hf.get_base_model().named_modules() if isinstance(m, HFLayer)}
    assert sorted(hf_layers) == sorted(info.targeted)
    assert {n for n, m in hf_layers.items() if m.is_feedforward} == {
        n for n, m in ia3_layers(model).items() if m.feedforward
    }
    hf_state = get_peft_model_state_dict(hf)
    assert set(hf_state) == set(saved)
    if arch == "bert":
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    assert max_diff(logits(hf, **inputs), ours) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_loads_in_ours(loaders, tmp_path, case):
    pytest.importorskip("peft")
    from peft import IA3Config, get_peft_model

    arch, params = CASES[case]
    load, inputs, task = loaders[arch]
    hf_task = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = get_peft_model(load(), IA3Config(task_type=hf_task, **params))
    perturb(hf, seed=1, scale=0.2)
    hf.eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    expected = logits(hf, **inputs)

    model = load()
    info = load_adapter(model, tmp_path / "hf")
    assert info.task == task
    saved = load_file(str(tmp_path / "hf" / WEIGHTS_NAME))
    assert set(saved) == {f"base_model.model.{n}" for n in info.param_names}
    assert max_diff(logits(model.eval(), **inputs), expected) < 1e-5
