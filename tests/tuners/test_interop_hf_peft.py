"""HF PEFT is the oracle: adapters we save load in HF PEFT, and adapters HF PEFT saves load here, to fp32 precision."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftcli.errors import AdapterError
from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from peftcli.tuners.lora.layers import LoraLinear
from peftcli.tuners.lora.spec import LoraParams

from support import logits, max_diff, perturb

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOL = 1e-5


def randomize(model: nn.Module, names_with: tuple[str, ...], seed: int = 0, scale: float = 0.1) -> int:
    """Add seeded noise to every parameter whose name contains one of `names_with`; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names_with):
                param.add_(torch.randn(param.shape, generator=gen) * scale)
                count += 1
    return count


def hf_adapted_modules(hf_model) -> list[str]:
    """Names (relative to the base model) of the modules HF PEFT wrapped with LoRA."""
    from peft.tuners.lora import LoraLayer

    base = hf_model.get_base_model()
    return sorted(name for name, module in base.named_modules() if isinstance(module, LoraLayer))


# --- ours -> HF PEFT ----------------------------------------------------------------------------------------------

OURS_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q_proj|o_proj|down_proj)"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude": dict(target_modules="all-linear", exclude_modules=["down_proj", "layers.0.self_attn.k_proj"]),
    "rslora": dict(target_modules=["q_proj", "k_proj", "up_proj"], rslora=True, r=4, alpha=16),
    "float-alpha": dict(target_modules=["v_proj"], r=8, alpha=3.5),
    "dropout": dict(target_modules="all-linear", dropout=0.3),
    "gaussian": dict(target_modules=["gate_proj"], init="gaussian"),
    "modules_to_save": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("params", list(OURS_CASES.values()), ids=list(OURS_CASES))
def test_ours_loads_in_hf_peft(load_base, input_ids, tiny_model_dir, tmp_path, params):
    from peft import PeftModel, get_peft_model_state_dict

    params = {"r": 4, "alpha": 8, **params}
    model = load_base()
    info = apply_adapter(model, LoraParams(**params))
    assert randomize(model, ("lora_B",)) == len(info.targeted)
    if params.get("modules_to_save"):
        assert randomize(model, ("lm_head",), seed=1) == 1
    model.eval()
    ours = logits(model, input_ids)
    assert max_diff(ours, logits(load_base(), input_ids)) > 1e-3  # the adapter is not the identity

    out = tmp_path / "adapter"
    save_adapter(model, out, base_model_name_or_path=str(tiny_model_dir))
    saved = load_file(str(out / WEIGHTS_NAME))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = PeftModel.from_pretrained(load_base(), str(out)).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()]

    assert hf_adapted_modules(hf) == sorted(info.targeted)
    hf_state = get_peft_model_state_dict(hf)
    assert set(hf_state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(hf_state[key], value), key
    if params.get("modules_to_save"):
        assert "base_model.model.lm_head.weight" in saved

    diff = max_diff(logits(hf, input_ids), ours)
    assert diff < TOL, f"HF PEFT logits differ from ours by {diff}"


def test_saved_config_is_read_by_hf_peft(load_base, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftConfig

    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=16, rslora=True, dropout=0.1, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir))
    config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 16, 0.1, True)
    assert config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == str(tiny_model_dir)
    assert config.target_modules == {"q_proj"}  # one suffix selects the q_proj of every layer


def test_saved_targets_are_suffixes_only_where_they_select_the_same_modules(load_base, tiny_model_dir, tmp_path):
    """all-linear is written as the layer suffixes (not a path per layer) and HF PEFT wraps exactly what we
    wrapped; a choice that suffixes cannot express (one layer's q_proj) keeps its full path."""
    from peft import PeftModel

    model = load_base()
    info = apply_adapter(model, LoraParams(r=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "all", base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    suffixes = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["target_modules"] == suffixes and len(info.targeted) == 7 * 2
    hf = PeftModel.from_pretrained(load_base(), tmp_path / "all")
    wrapped = {name.removeprefix("base_model.model.") for name, m in hf.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(info.targeted)

    model = load_base()
    apply_adapter(model, LoraParams(r=4, target_modules=["layers.0.self_attn.q_proj"]))
    save_adapter(model, tmp_path / "one", base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


# --- HF PEFT -> ours ----------------------------------------------------------------------------------------------

HF_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q_proj|o_proj|down_proj)"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude": dict(target_modules="all-linear", exclude_modules=["down_proj"]),
    "exclude-regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.1\..*"),
    "rslora": dict(target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True, r=4, lora_alpha=16),
    "dropout": dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.2),
    "modules_to_save": dict(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]),
    "gaussian-init": dict(target_modules=["v_proj"], init_lora_weights="gaussian"),
}


def _hf_adapter(load_base, out, **overrides):
    from peft import LoraConfig, get_peft_model

    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **overrides}
    torch.manual_seed(0)
    hf = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **kwargs))
    randomize(hf, ("lora_B",))  # non-zero B whatever the init
    if kwargs.get("modules_to_save"):
        assert randomize(hf, ("lm_head.modules_to_save",), seed=1) == 1
    hf.eval()
    hf.save_pretrained(str(out))
    return hf


@pytest.mark.parametrize("config", list(HF_CASES.values()), ids=list(HF_CASES))
def test_hf_peft_loads_in_ours(load_base, input_ids, tmp_path, config):
    out = tmp_path / "hf_adapter"
    hf = _hf_adapter(load_base, out, **config)
    expected = logits(hf, input_ids)
    assert max_diff(expected, logits(load_base(), input_ids)) > 1e-3

    model = load_base()
    info = load_adapter(model, out)
    model.eval()
    assert sorted(info.targeted) == hf_adapted_modules(hf)
    saved = load_file(str(out / WEIGHTS_NAME))
    named = dict(model.named_parameters())
    assert set(saved) == {"base_model.model." + n for n in info.param_names}
    for key, value in saved.items():
        assert torch.equal(named[key.removeprefix("base_model.model.")], value), key

    diff = max_diff(logits(model, input_ids), expected)
    assert diff < TOL, f"our logits differ from HF PEFT's by {diff}"


def test_hf_rslora_scaling_is_read(load_base, tmp_path):
    _hf_adapter(load_base, tmp_path / "a", target_modules=["q_proj"], use_rslora=True, r=16, lora_alpha=8)
    model = load_base()
    load_adapter(model, tmp_path / "a")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2
    assert all(m.scaling == pytest.approx(8 / 4) for m in layers)  # alpha / sqrt(16), not alpha / 16


# --- options beyond plain LoRA, both ways ----------------------------------------------------------------------


VARIANT_CASES = {
    "dora": (dict(target_modules=["q_proj", "v_proj", "down_proj"], dora=True), dict(use_dora=True)),
    "dora-all-linear-rslora": (
        dict(target_modules="all-linear", dora=True, rslora=True, dropout=0.1),
        dict(use_dora=True, use_rslora=True, lora_dropout=0.1),
    ),
    "rank-alpha-patterns": (
        dict(
            target_modules="all-linear",
            rank_pattern={"q_proj": 2, "^model.layers.1.mlp.up_proj": 6},
            alpha_pattern={"v_proj": 3},
        ),
        dict(rank_pattern={"q_proj": 2, "^model.layers.1.mlp.up_proj": 6}, alpha_pattern={"v_proj": 3}),
    ),
    "layers_to_transform": (
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        dict(layers_to_transform=[1]),
    ),
    "layers_to_transform-pattern": (
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0, layers_pattern="layers"),
        dict(layers_to_transform=0, layers_pattern="layers"),
    ),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), {}),
    "embedding-dora": (dict(target_modules=["embed_tokens", "lm_head"], dora=True), dict(use_dora=True)),
}


@pytest.mark.parametrize(("ours", "hf_fields"), list(VARIANT_CASES.values()), ids=list(VARIANT_CASES))
def test_variants_load_in_hf_peft(load_base, input_ids, tiny_model_dir, tmp_path, ours, hf_fields):
    from peft import LoraConfig, PeftModel

    model = load_base()
    info = apply_adapter(model, LoraParams(r=4, alpha=8, **ours))
    assert perturb(model) == len(info.param_names)
    model.eval()
    expected = logits(model, input_ids)
    assert max_diff(expected, logits(load_base(), input_ids)) > 1e-3

    save_adapter(model, tmp_path, base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key, value in hf_fields.items():
        assert config[key] == value, key
    hf = PeftModel.from_pretrained(load_base(), str(tmp_path)).eval()
    assert isinstance(hf.peft_config["default"], LoraConfig)
    assert hf_adapted_modules(hf) == sorted(info.targeted)
    diff = max_diff(logits(hf, input_ids), expected)
    assert diff < TOL, f"HF PEFT logits differ from ours by {diff}"


HF_VARIANT_CASES = {
    "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    "dora-dropout-rslora": dict(
        target_modules=["k_proj", "gate_proj"], use_dora=True, use_rslora=True, lora_dropout=0.1
    ),
    "rank_pattern": dict(
        target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"q_proj": 2, "^model.layers.1.mlp.up_proj": 8}
    ),
    "alpha_pattern": dict(target_modules="all-linear", alpha_pattern={"mlp\\..*_proj": 2, "o_proj": 32}),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
    "layers_to_transform-int": dict(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="layers"),
}


@pytest.mark.parametrize("config", list(HF_VARIANT_CASES.values()), ids=list(HF_VARIANT_CASES))
def test_hf_peft_variants_load_in_ours(load_base, input_ids, tmp_path, config):
    hf = _hf_adapter(load_base, tmp_path, **config)
    perturb(hf, seed=2)  # magnitudes too
    hf.eval()
    hf.save_pretrained(str(tmp_path))
    expected = logits(hf, input_ids)
    model = load_base()
    info = load_adapter(model, tmp_path)
    model.eval()
    assert sorted(info.targeted) == hf_adapted_modules(hf)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(saved) == {"base_model.model." + n for n in info.param_names}
    diff = max_diff(logits(model, input_ids), expected)
    assert diff < TOL, f"our logits differ from HF PEFT's by {diff}"


# --- HF PEFT options we cannot reproduce must be refused, not silently mis-loaded --------------------------------


@pytest.mark.parametrize(
    ("option", "word"),
    [
        (dict(init_lora_weights="pissa"), "pissa"),
        (dict(init_lora_weights="pissa_niter_2"), "pissa"),
        (dict(init_lora_weights="olora"), "olora"),
        (dict(alora_invocation_tokens=[7]), "alora_invocation_tokens"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="lora_only"), "bias"),
        (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    ],
    ids=["pissa", "pissa_niter", "olora", "alora", "lora_bias", "bias", "layer_replication"],
)
def test_unsupported_hf_options_are_refused(load_base, tmp_path, option, word):
    out = tmp_path / "hf_adapter"
    init = option.get("init_lora_weights", False)
    _hf_adapter(load_base, out, target_modules=["q_proj", "v_proj"], **{**option, "init_lora_weights": init})
    assert json.loads((out / CONFIG_NAME).read_text())  # HF PEFT wrote it
    with pytest.raises(AdapterError, match=word):
        load_adapter(load_base(), out)


def test_unconverted_pissa_is_refused_before_touching_the_model(load_base, tmp_path):
    out = tmp_path / "pissa"
    _hf_adapter(load_base, out, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True)
    model = load_base()
    with pytest.raises(AdapterError, match="path_initial_model_for_weight_conversion"):
        load_adapter(model, out)
    assert getattr(model, "peftcli_adapter", None) is None
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def _empty_as_none(value):
    return None if value in (None, [], {}) else value


@pytest.mark.parametrize(
    ("method", "hf_class"),
    [("lora", "LoraConfig"), ("loha", "LoHaConfig"), ("lokr", "LoKrConfig"), ("adalora", "AdaLoraConfig")],
)
def test_keys_an_hf_config_leaves_out_take_hf_peft_defaults(method, hf_class):
    """Each method's HF_FIELDS lists our field for every HF key it reads; a config without those keys must give
    exactly HF PEFT's defaults (our own defaults, except where the spec declares HF's differ)."""
    import dataclasses
    import importlib

    import peft

    from peftcli.tuners.registry import get_tuner

    spec = get_tuner(method)
    names = importlib.import_module(f"peftcli.tuners.{method}.spec").HF_FIELDS
    hf_default = {}
    for field in dataclasses.fields(getattr(peft, hf_class)):
        factory = field.default_factory
        hf_default[field.name] = factory() if factory is not dataclasses.MISSING else field.default
    minimal = {"peft_type": spec.peft_type, "target_modules": ["q_proj"], "r": 8}  # what an HF config always has
    params = spec.from_hf_config(minimal)
    for ours, theirs in names.items():
        assert _empty_as_none(getattr(params, ours)) == _empty_as_none(hf_default[theirs]), (ours, theirs)
    assert params.alpha == hf_default["lora_alpha" if method in ("lora", "adalora") else "alpha"]
