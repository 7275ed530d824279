"""Bottleneck adapters: placements per architecture, identity at start, sizes, maths, save/load, no merge."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from peftcli.errors import AdapterError, PeftCliError
from peftcli.examples.tiny import build_llama
from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, load_adapter, merge_adapter, save_adapter
from peftcli.tuners.bottleneck.layers import BottleneckAdapter
from peftcli.tuners.bottleneck.spec import BottleneckParams
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import max_diff, perturb


def llama_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


@pytest.fixture
def encoder_batch():
    ids = torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- placements -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("houlsby", ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"]),
        ("pfeiffer", ["model.layers.{i}.mlp.down_proj"]),
    ],
)
def test_llama_placements_and_identity(placement, expected, load_base, input_ids):
    base = llama_logits(load_base(), input_ids)
    model = load_base()
    info = apply_adapter(model, BottleneckParams(placement=placement))
    assert info.targeted == [name.format(i=i) for i in (0, 1) for name in expected]
    assert torch.equal(llama_logits(model, input_ids), base), "the zero up-projection makes it the identity"
    for layer in adapters(model).values():
        assert layer.adapter_down.out_features == 64 // 16
        assert torch.count_nonzero(layer.adapter_down.weight) > 0
        assert torch.count_nonzero(layer.adapter_up.weight) == 0 and torch.count_nonzero(layer.adapter_up.bias) == 0
    perturb(model)
    assert max_diff(llama_logits(model, input_ids), base) > 1e-3


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize(("fixture", "auto", "task"), [
    ("tiny_bert_dir", AutoModelForSequenceClassification, "seq_cls"),
    ("tiny_bert_token_dir", AutoModelForTokenClassification, "token_cls"),
])  # fmt: skip
def test_bert_placements(placement, fixture, auto, task, request, encoder_batch):
    path = request.getfixturevalue(fixture)
    with torch.no_grad():
        base = auto.from_pretrained(path).eval()(**encoder_batch).logits
    model = auto.from_pretrained(path).eval()
    info = apply_adapter(model, BottleneckParams(placement=placement), AdapterContext(task=task))
    ffn = [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    attention = [f"bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    if placement == "houlsby":
        assert info.targeted == [attention[0], ffn[0], attention[1], ffn[1]]
    else:
        assert info.targeted == ffn  # `output.dense` as a suffix would also catch attention.output.dense
    assert info.head_modules == ("classifier",)
    assert any(n.startswith("classifier.") for n in info.param_names)
    with torch.no_grad():
        assert torch.equal(model(**encoder_batch).logits, base)


def test_t5_houlsby_skips_cross_attention(tiny_t5_dir, encoder_batch):
    batch = {**encoder_batch, "decoder_input_ids": torch.randint(5, 390, (2, 4), generator=torch.Generator())}
    with torch.no_grad():
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()(**batch).logits
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    info = apply_adapter(model, BottleneckParams(placement="houlsby"), AdapterContext(task="seq2seq"))
    assert len(info.targeted) == 8  # 2 encoder + 2 decoder blocks, two adapters each
    assert not [n for n in info.targeted if "EncDecAttention" in n]
    assert {n.rsplit(".", 1)[-1] for n in info.targeted} == {"o", "wo"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)  # T5 reads wo.weight.dtype through the wrapper
        perturb(model)
        assert max_diff(model(**batch).logits, base) > 1e-4


def test_target_modules_override_placement(load_base):
    model = load_base()
    info = apply_adapter(model, BottleneckParams(placement="houlsby", target_modules=["up_proj"], bottleneck_size=5))
    assert info.targeted == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    layer = adapters(model)["model.layers.0.mlp.up_proj"]
    assert (layer.adapter_down.in_features, layer.adapter_down.out_features) == (128, 5)  # up_proj's output: 128


def test_non_linear_target_is_refused(load_base):
    with pytest.raises(PeftCliError, match="method.target_modules: input_layernorm is not a layer bottleneck"):
        apply_adapter(load_base(), BottleneckParams(target_modules=["input_layernorm"]))


def test_unknown_architecture_asks_for_target_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(PeftCliError, match="method.target_modules: bottleneck has no built-in placement for model"):
        apply_adapter(Tiny(), BottleneckParams())
    model = Tiny()
    info = apply_adapter(model, BottleneckParams(target_modules=["proj"], bottleneck_size=2))
    assert info.targeted == ["proj"]


def test_works_on_a_meta_device_model():
    """`peft targets` applies methods to a weightless model."""
    with torch.device("meta"):
        model = build_llama(400)
    info = apply_adapter(model, BottleneckParams(placement="houlsby", reduction_factor=8))
    assert len(info.targeted) == 4
    assert info.trainable_count(model) == 4 * (64 * 8 + 8 + 8 * 64 + 64)


# --- sizes, maths, validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "size"),
    [({}, 4), (dict(reduction_factor=5), 12), (dict(reduction_factor=2.5), 25), (dict(reduction_factor=1000), 1),
     (dict(bottleneck_size=7), 7), (dict(reduction_factor=None, bottleneck_size=3), 3)],
)  # fmt: skip
def test_bottleneck_size(options, size):
    assert BottleneckParams(**options).size_for(64) == size


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_adapter_maths(activation):
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    layer = BottleneckAdapter(base, 3, activation, dropout=0.0)
    perturb(layer)
    x = torch.randn(4, 6)
    h = base(x)
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}[activation]
    expected = h + layer.adapter_up(act(layer.adapter_down(h)))
    assert max_diff(layer(x), expected) < 1e-6
    assert layer.weight is base.weight and layer.out_features == 10


@pytest.mark.parametrize(
    ("options", "word"),
    [
        (dict(reduction_factor=4, bottleneck_size=8), "either reduction_factor or bottleneck_size, not both"),
        (dict(reduction_factor=0), "reduction_factor"),
        (dict(reduction_factor=-2), "reduction_factor"),
        (dict(bottleneck_size=0), "bottleneck_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(activation="swish"), "activation"),
        (dict(placement="parallel"), "placement"),
        (dict(target_modules=[]), "at least one module"),
        (dict(r=8), "r"),
    ],
)
def test_recipe_validation(options, word):
    with pytest.raises(ValidationError, match=word):
        BottleneckParams(**options)


def test_capabilities_and_merge_refusal(load_base):
    spec = get_tuner("bottleneck")
    caps = spec.capabilities
    assert not caps.mergeable and not spec.in_hf_peft and spec.peft_type == "PEFTCLI_BOTTLENECK"
    assert set(caps.task_types) == {"causal_lm", "seq_cls", "token_cls", "seq2seq"}
    assert "lora" in spec.merge_refusal
    model = load_base()
    apply_adapter(model, BottleneckParams())
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapter(model)


# --- training, precision, save/load ---------------------------------------------------------------------------


def test_training_moves_only_the_adapter(load_base, input_ids):
    model = load_base()
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    info = apply_adapter(model, BottleneckParams(placement="houlsby", bottleneck_size=8, activation="gelu"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == info.param_names
    assert all(".adapter_down." in n or ".adapter_up." in n for n in info.param_names)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    named = dict(model.named_parameters())
    for name, before in frozen.items():
        wrapped = name.replace("o_proj.", "o_proj.base_layer.").replace("down_proj.", "down_proj.base_layer.")
        assert torch.equal(named[wrapped], before), name
    assert all(torch.count_nonzero(m.adapter_up.weight) > 0 for m in adapters(model).values())


def test_dropout_only_in_training(load_base, input_ids):
    model = load_base()
    apply_adapter(model, BottleneckParams(dropout=0.5))
    perturb(model, scale=0.5)
    model.eval()
    first = llama_logits(model, input_ids)
    assert torch.equal(first, llama_logits(model, input_ids))
    model.train()
    assert max_diff(llama_logits(model, input_ids), first) > 1e-4


def test_half_precision_base(load_base, input_ids):
    model = load_base().to(torch.bfloat16)
    apply_adapter(model, BottleneckParams(placement="houlsby"))
    perturb(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    out = llama_logits(model, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_and_load(load_base, input_ids, tmp_path):
    model = load_base()
    params = BottleneckParams(placement="houlsby", reduction_factor=8, activation="tanh")
    info = apply_adapter(model, params)
    perturb(model)
    expected = llama_logits(model, input_ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PEFTCLI_BOTTLENECK"
    # resolved (not re-derived from the table on load) and written as the suffixes that select exactly those
    assert config["target_modules"] == ["down_proj", "o_proj"] and len(info.targeted) == 4
    assert (config["placement"], config["reduction_factor"], config["activation"]) == ("houlsby", 8, "tanh")
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == {"base_model.model." + n for n in info.param_names}

    loaded = load_base()
    loaded_info = load_adapter(loaded, tmp_path)
    assert loaded_info.targeted == info.targeted
    assert loaded_info.params.activation == "tanh" and loaded_info.params.size_for(64) == 8
    assert max_diff(llama_logits(loaded, input_ids), expected) < 1e-6
