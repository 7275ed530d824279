"""LayerNorm tuning: default targets, HF-equal keys, identity, merge, dtypes, save/load and HF PEFT interop."""

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
from peftcli.tuners.ln_tuning.layers import LNTuningLayer, is_norm
from peftcli.tuners.ln_tuning.spec import SPEC, LNTuningParams
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import tuner_for_peft_type

from support import logits, max_diff, perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

LLAMA_NORMS = [
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
    "model.norm",
]


def ln_layers(model: nn.Module) -> dict[str, LNTuningLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LNTuningLayer)}


@pytest.fixture
def load_bert(tiny_bert_dir):
    return lambda: AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()


@pytest.fixture
def load_t5(tiny_t5_dir):
    return lambda: AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir, dtype=torch.float32).eval()


# --- registry and recipe rules -----------------------------------------------------------------------------------


def test_registered_with_honest_capabilities():
    assert tuner_for_peft_type("LN_TUNING") is SPEC and SPEC.in_hf_peft and SPEC.name == "ln_tuning"
    caps = SPEC.capabilities
    assert caps.kind == "wraps_layers" and caps.mergeable and not caps.zero3_safe
    assert set(caps.task_types) == {"causal_lm", "seq_cls", "token_cls", "seq2seq"}
    for name, field in LNTuningParams.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(target_modules="all-linear"), "does not apply"),
        (dict(target_modules=[]), "at least one"),
        (dict(exclude_modules=" "), "empty"),
        (dict(r=4), "r"),
    ],
)
def test_recipe_rules(kwargs, word):
    with pytest.raises(ValidationError, match=word):
        LNTuningParams(**kwargs)


def test_norms_are_found_by_class_name():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert is_norm(nn.LayerNorm(4)) and is_norm(LlamaRMSNorm(4)) and is_norm(T5LayerNorm(4))
    assert not is_norm(nn.Linear(4, 4)) and not is_norm(nn.BatchNorm1d(4))


# --- applying -----------------------------------------------------------------------------------------------------


def test_llama_defaults_identity_and_keys(load_base, input_ids):
    expected = logits(load_base(), input_ids=input_ids)
    model = load_base()
    info = apply_adapter(model, LNTuningParams())
    assert info.targeted == LLAMA_NORMS
    assert info.param_names == [f"{n}.ln_tuning_layers.weight" for n in LLAMA_NORMS]  # HF PEFT's key names
    for layer in ln_layers(model).values():
        assert layer.ln_tuning_layers is not layer.base_layer
        assert layer.ln_tuning_layers.weight.dtype == torch.float32
        assert torch.equal(layer.ln_tuning_layers.weight, layer.base_layer.weight)
        assert not layer.base_layer.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == info.param_names
    assert torch.equal(logits(model, input_ids=input_ids), expected)
    perturb(model, scale=0.2)
    assert max_diff(logits(model, input_ids=input_ids), expected) > 1e-3


def test_bert_and_t5_defaults(load_bert, load_t5, tiny_bert_token_dir, input_ids):
    model = load_bert()
    info = apply_adapter(model, LNTuningParams(), AdapterContext(task="seq_cls"))
    assert len(info.targeted) == 5 and all(n.endswith("LayerNorm") for n in info.targeted)
    assert {n.rsplit(".", 1)[-1] for n in info.param_names} == {"weight", "bias"}
    assert {"classifier.weight", "classifier.bias"} <= set(info.param_names)
    token = AutoModelForTokenClassification.from_pretrained(tiny_bert_token_dir)
    assert len(apply_adapter(token, LNTuningParams(), AdapterContext(task="token_cls")).targeted) == 5

    t5 = load_t5()
    ids = input_ids.clamp(min=5)
    expected = logits(load_t5(), input_ids=ids, decoder_input_ids=ids[:, :4])
    info = apply_adapter(t5, LNTuningParams(), AdapterContext(task="seq2seq"))
    assert {n.rsplit(".", 1)[-1] for n in info.targeted} == {"layer_norm", "final_layer_norm"}
    assert len(info.targeted) == 2 * 2 + 3 * 2 + 2  # encoder blocks 2 norms, decoder blocks 3, two final norms
    assert torch.equal(logits(t5, input_ids=ids, decoder_input_ids=ids[:, :4]), expected)


def test_target_and_exclude_modules(load_base):
    info = apply_adapter(load_base(), LNTuningParams(target_modules=["input_layernorm", "norm"]))
    assert info.targeted == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    info = apply_adapter(load_base(), LNTuningParams(target_modules=r".*layers\.1\..*norm"))
    assert info.targeted == ["model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]
    # A regex over a whole block takes the modules that hold parameters (norms and linear layers), not containers.
    info = apply_adapter(load_base(), LNTuningParams(target_modules=r".*layers\.1\..*"))
    assert len(info.targeted) == 9 and "model.layers.1.mlp" not in info.targeted
    info = apply_adapter(load_base(), LNTuningParams(exclude_modules=["norm", "post_attention_layernorm"]))
    assert info.targeted == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]


def test_any_module_with_parameters_can_be_targeted(load_base, input_ids):
    # As in HF PEFT, which also tunes embeddings and heads this way (llava's defaults).
    model = load_base()
    info = apply_adapter(model, LNTuningParams(target_modules=["embed_tokens", "norm"]))
    assert info.targeted == ["model.embed_tokens", "model.norm"]
    assert "model.embed_tokens.ln_tuning_layers.weight" in info.param_names
    assert torch.equal(logits(model, input_ids=input_ids), logits(load_base(), input_ids=input_ids))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(target_modules=["layernorm_x"]), "layernorm_x matched nothing; normalisation layers: input_layernorm"),
        (dict(target_modules=["rotary_emb"]), "has no parameters of its own"),
        (dict(target_modules=["mlp"]), "mlp has no parameters of its own; name the layers inside it"),
        (dict(exclude_modules=r".*norm"), "nothing left to tune"),
    ],
)
def test_bad_targets_are_clear_errors(load_base, kwargs, word):
    with pytest.raises(PeftCliError, match=word) as err:
        apply_adapter(load_base(), LNTuningParams(**kwargs))
    assert str(err.value).startswith("method.target_modules:")


def test_model_without_norms_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(PeftCliError, match="no LayerNorm/RMSNorm layer; name the modules"):
        apply_adapter(model, LNTuningParams())


# --- merge, dtypes, training --------------------------------------------------------------------------------------


def test_merge_writes_the_tuned_norm_and_unmerge_restores(load_base, input_ids):
    model = load_base()
    apply_adapter(model, LNTuningParams())
    perturb(model, scale=0.2)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, input_ids=input_ids)
    merge_adapter(model)
    merge_adapter(model)  # idempotent
    for name, layer in ln_layers(model).items():
        assert torch.equal(layer.base_layer.weight, layer.ln_tuning_layers.weight), name
    assert max_diff(logits(model, input_ids=input_ids), unmerged) < 1e-5
    unmerge_adapter(model)
    unmerge_adapter(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)
    assert torch.equal(logits(model, input_ids=input_ids), unmerged)


def test_half_precision_base(load_base, input_ids):
    model = load_base().to(torch.bfloat16)
    apply_adapter(model, LNTuningParams())
    layer = ln_layers(model)["model.norm"]
    assert layer.ln_tuning_layers.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    perturb(model, scale=0.2)
    out = logits(model, input_ids=input_ids)
    assert out.dtype == torch.bfloat16
    merge_adapter(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    merged = logits(model, input_ids=input_ids).float()
    assert max_diff(merged, out.float()) < 0.05 * out.float().abs().max().item()


def test_training_updates_only_the_copies(load_base, input_ids):
    model = load_base()
    info = apply_adapter(model, LNTuningParams())
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
    for name in info.param_names:
        assert not torch.equal(named[name], named[name.replace("ln_tuning_layers", "base_layer")])
    assert all(torch.equal(named[n], v) for n, v in frozen.items())


# --- save / load and HF PEFT interop ------------------------------------------------------------------------------


def test_save_load_round_trip(load_base, input_ids, tiny_model_dir, tmp_path):
    model = load_base()
    info = apply_adapter(model, LNTuningParams(exclude_modules=["norm"]))
    perturb(model, scale=0.2)
    expected = logits(model, input_ids=input_ids)
    save_adapter(model, tmp_path / "a", str(tiny_model_dir))
    assert set(load_file(str(tmp_path / "a" / WEIGHTS_NAME))) == {f"base_model.model.{n}" for n in info.param_names}
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == [
        "input_layernorm",
        "post_attention_layernorm",
    ]
    fresh = load_base()
    assert load_adapter(fresh, tmp_path / "a").targeted == info.targeted
    assert torch.equal(logits(fresh, input_ids=input_ids), expected)


def test_hf_config_mapping():
    params = SPEC.from_hf_config(
        {"peft_type": "LN_TUNING", "target_modules": ["input_layernorm", "norm"], "modules_to_save": ["score"]}
    )
    assert params.target_modules == ["input_layernorm", "norm"] and params.modules_to_save == ["score"]
    config = SPEC.to_hf_config(LNTuningParams(), ["b.norm", "a.norm"])
    assert config == {"peft_type": "LN_TUNING", "target_modules": ["a.norm", "b.norm"], "exclude_modules": None,
                      "modules_to_save": None}  # fmt: skip


CASES = {
    "llama": ("llama", {}, {}),
    "llama-list": ("llama", dict(target_modules=["input_layernorm"]), dict(target_modules=["input_layernorm"])),
    "bert-seq-cls": ("bert", {}, dict(target_modules=["LayerNorm"])),
    "t5-seq2seq": ("t5", {}, {}),
}


@pytest.fixture
def loaders(load_base, load_bert, load_t5):
    return {
        "llama": (load_base, "causal_lm", "CAUSAL_LM"),
        "bert": (load_bert, "seq_cls", "SEQ_CLS"),
        "t5": (load_t5, "seq2seq", "SEQ_2_SEQ_LM"),
    }


def model_inputs(arch: str, ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if arch == "t5" else {"input_ids": ids}


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_hf_peft(loaders, input_ids, tmp_path, case):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model_state_dict

    arch, ours_params, _ = CASES[case]
    load, task, _ = loaders[arch]
    ids = input_ids.clamp(min=5)
    model = load()
    info = apply_adapter(model, LNTuningParams(**ours_params), AdapterContext(task=task))
    perturb(model, scale=0.2)
    ours = logits(model, **model_inputs(arch, ids))
    save_adapter(model, tmp_path / "a", None)
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = PeftModel.from_pretrained(load(), str(tmp_path / "a")).eval()
    from peft.tuners.ln_tuning.layer import LNTuningLayer as HFLayer

    assert sorted(n for n, m in hf.get_base_model().named_modules() if isinstance(m, HFLayer)) == sorted(info.targeted)
    assert set(get_peft_model_state_dict(hf)) == set(saved)
    if arch == "bert":
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    assert max_diff(logits(hf, **model_inputs(arch, ids)), ours) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_loads_in_ours(loaders, input_ids, tmp_path, case):
    pytest.importorskip("peft")
    from peft import LNTuningConfig, get_peft_model

    arch, _, hf_params = CASES[case]
    load, task, hf_task = loaders[arch]
    ids = input_ids.clamp(min=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = get_peft_model(load(), LNTuningConfig(task_type=hf_task, **hf_params))
    assert perturb(hf, seed=1, scale=0.2) > 0
    hf.eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    expected = logits(hf, **model_inputs(arch, ids))
    model = load()
    info = load_adapter(model, tmp_path / "hf")
    assert set(load_file(str(tmp_path / "hf" / WEIGHTS_NAME))) == {f"base_model.model.{n}" for n in info.param_names}
    assert max_diff(logits(model.eval(), **model_inputs(arch, ids)), expected) < 1e-5
