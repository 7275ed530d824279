"""LoHa and LoKr: HF PEFT's shapes, numerics and configs on Linear, Conv1d and Conv2d; dropouts; validation."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from peftcli.errors import AdapterError, PeftCliError
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.loha.layers import LohaLayer
from peftcli.tuners.loha.spec import LohaParams
from peftcli.tuners.lokr.layers import LokrLayer
from peftcli.tuners.lokr.spec import LokrParams, factorization

from support import max_diff, perturb

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOL = 1e-5
PARAMS = {"loha": LohaParams, "lokr": LokrParams}


class ConvNet(nn.Module):
    """A small model with Conv2d (3x3 and 1x1), Conv1d (k=3), a grouped conv and Linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=2)
        self.point = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1, stride=2)
        self.head = nn.Linear(6 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.point(torch.relu(self.grouped(h))))
        h = torch.relu(self.seq(h.mean(dim=2)))  # (batch, 8, 8) -> (batch, 6, 4)
        return self.head(h.flatten(1))


CONV_INPUT = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
CONV_TARGETS = ["conv", "grouped", "point", "seq", "head"]


def run(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(CONV_INPUT) if ids is None else model(input_ids=ids).logits


def hf_config(method: str, **kwargs):
    cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    return cls(**kwargs)


# Our params and the equivalent HF PEFT config fields, per case.
LLAMA_CASES = {
    "loha": ("loha", dict(r=4, alpha=8)),
    "loha-patterns": ("loha", dict(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 3.5})),
    "lokr": ("lokr", dict(r=4, alpha=8)),
    "lokr-small-r": ("lokr", dict(r=2, alpha=4)),
    "lokr-decompose-both": ("lokr", dict(r=2, alpha=4, decompose_both=True)),
    "lokr-factor": ("lokr", dict(r=8, decompose_factor=4, rank_dropout_scale=True)),
    "lokr-lycoris-init": ("lokr", dict(r=2, init="lycoris")),
}
CONV_CASES = {
    "loha-flat": ("loha", dict(r=2, alpha=3)),
    "loha-effective": ("loha", dict(r=2, alpha=3, use_effective_conv2d=True)),
    "lokr-flat": ("lokr", dict(r=1, alpha=2)),
    # No Conv1d here: HF PEFT 0.21 fails in forward on it (see test_lokr_effective_conv1d).
    "lokr-effective": (
        "lokr",
        dict(r=1, alpha=2, use_effective_conv2d=True, target_modules=["conv", "grouped", "point"]),
    ),
    "lokr-full": ("lokr", dict(r=8, alpha=2, decompose_both=True)),
}


def to_hf_kwargs(method: str, params: dict) -> dict:
    kwargs = dict(params)
    if "init" in kwargs:
        kwargs["init_weights"] = True if kwargs.pop("init") == "default" else "lycoris"
    return kwargs


def hf_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()}


# --- the pure parts -------------------------------------------------------------------------------------------


def test_factorization_matches_hf_peft():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dim in range(1, 260):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 100):
            assert factorization(dim, factor) == hf_factorization(dim, factor), (dim, factor)
    assert factorization(128) == (8, 16) and factorization(64) == (8, 8) and factorization(127) == (1, 127)


@pytest.mark.parametrize(
    ("method", "bad", "word"),
    [
        ("loha", dict(r=0), "r"),
        ("lokr", dict(r=-2), "r"),
        ("loha", dict(alpha=0), "alpha"),
        ("lokr", dict(rank_dropout=1.0), "rank_dropout"),
        ("loha", dict(module_dropout=-0.1), "module_dropout"),
        ("lokr", dict(decompose_factor=0), "decompose_factor"),
        ("lokr", dict(decompose_factor=-3), "decompose_factor"),
        ("loha", dict(rank_pattern={"q_proj(": 2}), "not a valid regex"),
        ("lokr", dict(rank_pattern={"q_proj": 0}), "must be > 0"),
        ("loha", dict(alpha_pattern={"": 2.0}), "must not be empty"),
        ("loha", dict(target_modules=[]), "at least one module"),
        ("lokr", dict(init="gaussian"), "init"),
        ("loha", dict(lora_alpha=8), "lora_alpha"),
    ],
)
def test_recipe_validation(method, bad, word):
    with pytest.raises(ValidationError, match=word):
        PARAMS[method](**bad)


# --- layers on the tiny Llama --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params"), list(LLAMA_CASES.values()), ids=list(LLAMA_CASES))
def test_llama_identity_shapes_and_hf_interop_both_ways(method, params, load_base, input_ids, tmp_path):
    base_logits = run(load_base(), input_ids)
    model = load_base()
    info = apply_adapter(model, PARAMS[method](**params))
    assert len(info.targeted) == 14  # all-linear: every projection, not the LM head
    assert torch.equal(run(model, input_ids), base_logits), "identity at init"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    # The same config in HF PEFT builds tensors of exactly our names and shapes.
    torch.manual_seed(0)
    hf_fresh = peft.get_peft_model(
        load_base(), hf_config(method, target_modules="all-linear", **to_hf_kwargs(method, params))
    )
    ours_shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    assert ours_shapes == hf_shapes(hf_fresh)

    # ours -> HF PEFT
    assert perturb(model) == len(info.param_names)
    expected = run(model, input_ids)
    assert max_diff(expected, base_logits) > 1e-3
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    theirs = peft.PeftModel.from_pretrained(load_base(), tmp_path / "ours").eval()
    assert max_diff(run(theirs, input_ids), expected) < TOL

    # HF PEFT -> ours, from HF's own config and init (init_weights=False: every factor random)
    torch.manual_seed(1)
    kwargs = {**to_hf_kwargs(method, params), "init_weights": False}
    hf = peft.get_peft_model(load_base(), hf_config(method, target_modules=["q_proj", "down_proj"], **kwargs)).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_base()
    loaded_info = load_adapter(loaded, tmp_path / "theirs")
    assert len(loaded_info.targeted) == 4
    assert max_diff(run(loaded, input_ids), run(hf, input_ids)) < TOL


def test_layer_factors_follow_hf_rules(load_base):
    # q_proj is 64 -> 64 (8 x 8 splits), k_proj 64 -> 32 (4 x 8 and 8 x 8).
    model = load_base()
    apply_adapter(model, LokrParams(r=2, decompose_both=True, target_modules=["q_proj", "k_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LokrLayer)
    assert sorted(q._parameters) == ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]  # r=2 < 8/2
    assert torch.count_nonzero(q.lokr_w1_a) == 0 and torch.count_nonzero(q.lokr_w1_b) > 0
    model = load_base()
    apply_adapter(model, LokrParams(r=4, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert sorted(q._parameters) == ["lokr_w1", "lokr_w2"]  # r=4 >= 8/2: trained in full
    assert q.scaling == pytest.approx(8 / 4)
    model = load_base()
    apply_adapter(model, LohaParams(r=3, alpha=6, target_modules=["k_proj"]))
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, LohaLayer) and k.scaling == 2
    assert tuple(k.hada_w1_a.shape) == (32, 3) and tuple(k.hada_w2_b.shape) == (3, 64)
    assert torch.count_nonzero(k.hada_w2_b) == 0 and torch.count_nonzero(k.hada_w1_a) > 0


def test_rank_and_alpha_patterns_reach_the_layers(load_base):
    model = load_base()
    params = LohaParams(r=4, alpha=8, rank_pattern={"^model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 1})
    apply_adapter(model, params)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LohaLayer)}
    assert layers["model.layers.0.self_attn.q_proj"].r == 2
    assert layers["model.layers.1.self_attn.q_proj"].r == 4  # ^ anchors at the start of the full name
    assert layers["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(1 / 4)
    assert layers["model.layers.1.self_attn.k_proj"].scaling == pytest.approx(2)


def test_unmatched_pattern_is_an_error(load_base):
    with pytest.raises(PeftCliError, match="method.rank_pattern: qproj"):
        apply_adapter(load_base(), LokrParams(rank_pattern={"qproj": 2}))


# --- Conv2d / Conv1d ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params"), list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv_identity_shapes_merge_and_hf_interop(method, params, tmp_path):
    params = {"target_modules": CONV_TARGETS, **params}
    base_out = run(ConvNet().eval())
    model = ConvNet().eval()
    info = apply_adapter(model, PARAMS[method](**params))
    assert info.targeted == params["target_modules"]
    assert torch.equal(run(model), base_out)

    torch.manual_seed(0)
    hf_fresh = peft.get_peft_model(ConvNet().eval(), hf_config(method, **params))
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()} == hf_shapes(hf_fresh)
    if params.get("use_effective_conv2d"):
        names = set(adapter_state_dict(model))
        core = "hada_t1" if method == "loha" else "lokr_t2"
        assert f"base_model.model.conv.{core}" in names
        assert f"base_model.model.point.{core}" not in names  # 1x1 kernels stay flat, as in HF PEFT

    perturb(model)
    expected = run(model)
    assert max_diff(expected, base_out) > 1e-3
    save_adapter(model, tmp_path / "ours", base_model_name_or_path=None)
    # We always record a task (causal_lm here); HF would then want a language model, so read it as task-less.
    config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    config.task_type = None
    theirs = peft.PeftModel.from_pretrained(ConvNet().eval(), tmp_path / "ours", config=config).eval()
    assert max_diff(run(theirs), expected) < TOL

    torch.manual_seed(1)
    hf = peft.get_peft_model(ConvNet().eval(), hf_config(method, init_weights=False, **params)).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = ConvNet().eval()
    load_adapter(loaded, tmp_path / "theirs")
    assert max_diff(run(loaded), run(hf)) < TOL

    base_state = {k: v.clone() for k, v in ConvNet().state_dict().items()}
    merge_adapter(model)
    merge_adapter(model)
    assert max_diff(run(model), expected) < 1e-4
    unmerge_adapter(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for key, value in base_state.items():
        assert max_diff(restored[key], value) < 1e-5, key


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_effective_conv1d(method):
    """A k=3 Conv1d gets an (r, r, 3, 1) core, shapes as HF PEFT's; merged output equals unmerged."""
    params = dict(r=1, use_effective_conv2d=True, target_modules=["seq"])
    model = ConvNet().eval()
    apply_adapter(model, PARAMS[method](**params))
    hf_fresh = peft.get_peft_model(ConvNet().eval(), hf_config(method, **params))
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    assert shapes == hf_shapes(hf_fresh)
    core = "hada_t1" if method == "loha" else "lokr_t2"
    assert shapes[f"base_model.model.seq.{core}"] == (1, 1, 3, 1)
    perturb(model, scale=1.0)
    unmerged = run(model)
    assert max_diff(unmerged, run(ConvNet().eval())) > 1e-3
    merge_adapter(model)
    assert max_diff(run(model), unmerged) < 1e-4


def test_all_linear_skips_convolutions():
    model = ConvNet()
    info = apply_adapter(model, LohaParams(r=2))
    assert info.targeted == ["head"]


def test_non_zero_padding_is_refused():
    model = ConvNet()
    model.conv.padding_mode = "reflect"
    with pytest.raises(PeftCliError, match="method.target_modules: conv pads with 'reflect'"):
        apply_adapter(model, LokrParams(target_modules=["conv"]))


def test_wrapped_conv_still_looks_like_a_conv():
    model = ConvNet()
    apply_adapter(model, LokrParams(r=1, target_modules=["conv"]))
    assert model.conv.kernel_size == (3, 3) and model.conv.weight is model.conv.base_layer.weight


# --- training-time behaviour ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_training_moves_the_zero_factor(method, load_base, input_ids):
    model = load_base()
    apply_adapter(model, PARAMS[method](r=2, target_modules=["q_proj", "v_proj"]))
    zero_name = "hada_w2_b" if method == "loha" else "lokr_w1"
    zeros = [p for n, p in model.named_parameters() if n.endswith(zero_name)]
    assert zeros and all(torch.count_nonzero(p) == 0 for p in zeros)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(torch.count_nonzero(p) > 0 for p in zeros)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_dropouts_act_only_in_training(method, load_base, input_ids):
    model = load_base()
    apply_adapter(model, PARAMS[method](r=2, rank_dropout=0.5, target_modules="all-linear"))
    perturb(model)
    model.eval()
    first = run(model, input_ids)
    assert torch.equal(first, run(model, input_ids))
    model.train()
    torch.manual_seed(0)
    dropped = run(model, input_ids)
    assert max_diff(dropped, first) > 1e-4

    # module_dropout close to 1 skips (nearly) every update in training, none in eval.
    model = load_base()
    base_logits = run(model, input_ids)
    apply_adapter(model, PARAMS[method](r=2, module_dropout=0.999))
    perturb(model)
    model.train()
    torch.manual_seed(0)
    assert max_diff(run(model, input_ids), base_logits) < 1e-5
    model.eval()
    assert max_diff(run(model, input_ids), base_logits) > 1e-3


def test_rank_dropout_rows(load_base):
    layer = LokrLayer(nn.Linear(16, 16), r=8, alpha=8, rank_dropout=0.5, rank_dropout_scale=False)
    perturb(layer)
    torch.manual_seed(0)
    full, dropped = layer.delta_weight(), layer.delta_weight(rank_drop=True)
    kept = (dropped != 0).any(dim=1)
    assert 0 < kept.sum() < 16
    assert torch.equal(dropped[kept], full[kept])  # no rescaling without rank_dropout_scale
    loha = LohaLayer(nn.Linear(16, 16), r=2, alpha=2, rank_dropout=0.5)
    perturb(loha)
    torch.manual_seed(0)
    full, dropped = loha.delta_weight(), loha.delta_weight(rank_drop=True)
    kept = (dropped != 0).any(dim=1)
    assert torch.allclose(dropped[kept], full[kept] * 16 / kept.sum())  # LoHa always rescales


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_half_precision_base_keeps_fp32_factors(method, load_base, input_ids):
    model = load_base().to(torch.bfloat16)
    apply_adapter(model, PARAMS[method](r=2))
    perturb(model)
    factors = [p for p in model.parameters() if p.requires_grad]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    out = run(model, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    merge_adapter(model)
    assert weight.dtype == torch.bfloat16


# --- HF config mapping ---------------------------------------------------------------------------------------


def test_saved_config_fields(load_base, tmp_path):
    model = load_base()
    params = LokrParams(
        r=1, alpha=3, decompose_both=True, decompose_factor=4, rank_dropout=0.1, rank_dropout_scale=True,
        module_dropout=0.2, init="lycoris", target_modules=["q_proj"],
    )  # fmt: skip
    apply_adapter(model, params)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, peft.LoKrConfig)
    assert (config.r, config.alpha, config.decompose_both, config.decompose_factor) == (1, 3, True, 4)
    assert (config.rank_dropout, config.rank_dropout_scale, config.module_dropout) == (0.1, True, 0.2)
    assert config.init_weights == "lycoris"
    assert config.target_modules == {"q_proj"}  # one suffix selects the q_proj of every layer
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LOKR" and raw["task_type"] == "CAUSAL_LM"
    factors = ("w1_a", "w1_b", "w2_a", "w2_b")  # r=1 is below half of every split (4 x 4, 16 x 16)
    expected = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lokr_{n}" for i in (0, 1) for n in factors}
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == expected

    reloaded = load_base()
    info = load_adapter(reloaded, tmp_path)
    assert info.params.model_dump(exclude={"target_modules"}) == params.model_dump(exclude={"target_modules"})


@pytest.mark.parametrize(
    ("method", "option", "word"),
    [
        ("loha", dict(layers_to_transform=[0], layers_pattern="layers"), "layers_to_transform"),
        ("lokr", dict(layers_to_transform=0), "layers_to_transform"),
    ],
)
def test_unsupported_hf_options_are_refused(method, option, word, load_base, tmp_path):
    hf = peft.get_peft_model(load_base(), hf_config(method, target_modules=["q_proj"], **option))
    hf.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match=word):
        load_adapter(load_base(), tmp_path)


def test_architecture_default_targets_are_refused(load_base, tmp_path):
    hf = peft.get_peft_model(load_base(), peft.LoHaConfig(task_type="CAUSAL_LM"))  # HF picks q_proj, v_proj
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["target_modules"] = None
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="target_modules=null"):
        load_adapter(load_base(), tmp_path)


def test_hf_regex_targets_and_excludes_load(load_base, input_ids, tmp_path):
    torch.manual_seed(0)
    config = peft.LoKrConfig(
        r=2, target_modules=r".*\.(q_proj|down_proj)", exclude_modules=["layers.0.mlp.down_proj"], init_weights=False
    )
    hf = peft.get_peft_model(load_base(), config).eval()
    hf.save_pretrained(tmp_path)
    model = load_base()
    info = load_adapter(model, tmp_path)
    assert info.targeted == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert max_diff(run(model, input_ids), run(hf, input_ids)) < TOL


def test_a_pattern_key_for_modules_left_unadapted_is_accepted_as_in_lora(load_base):
    """One rule for every method (tuners/lora/patterns.py): HF PEFT adapters may carry keys for modules their
    target list leaves out; only a key that matches nothing in the model is a typo."""
    model = load_base()
    apply_adapter(model, LohaParams(target_modules=["q_proj"], rank_pattern={"v_proj": 2}))
    assert {m.r for m in model.modules() if isinstance(m, LohaLayer)} == {LohaParams().r}
