"""VeRA: seeded shared projections (HF PEFT's draw), their on-disk keys, interop both ways, merge/unmerge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.errors import AdapterError
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.vera.layers import VeraLinear, VeraProjections
from peftcli.tuners.vera.spec import VeraParams

from support import logits, max_diff, perturb

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in tiny"),
]
TOL = 1e-5


def test_layers_start_as_identity_with_d_initial(load_base, input_ids):
    model = load_base()
    apply_adapter(model, VeraParams(r=8, d_initial=0.05, target_modules=["q_proj"]))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, VeraLinear)
    assert torch.equal(layer.vera_lambda_d, torch.full((8,), 0.05))
    assert torch.equal(layer.vera_lambda_b, torch.zeros(64))
    assert max_diff(logits(model, input_ids), logits(load_base(), input_ids)) == 0


def test_every_option_is_described_and_defaults_apply_on_the_meta_device(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert all(field.description for field in VeraParams.model_fields.values())
    with torch.device("meta"):  # as `peft targets` and `peft methods` build models: no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    info = apply_adapter(model, VeraParams(), AdapterContext(total_steps=100))
    assert len(info.targeted) == 14 and info.trainable_count(model) > 0


def test_projections_are_shared_frozen_buffers_sized_for_the_largest_layer(load_base):
    model = load_base()
    info = apply_adapter(model, VeraParams(r=8, target_modules=["k_proj", "down_proj"]))
    shared = model.vera_projections
    assert isinstance(shared, VeraProjections)
    # k_proj is 64 -> 32 (2 KV heads), down_proj 128 -> 64: A covers the widest input, B the widest output.
    assert shared.vera_A.shape == (8, 128) and shared.vera_B.shape == (64, 8)
    assert all("vera_A" not in n and "vera_B" not in n for n, _ in model.named_parameters())
    assert info.param_names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in info.param_names)
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())  # never in the base's state dict
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 4 and all(layer._shared[0] is shared for layer in layers)
    k_proj = model.get_submodule("model.layers.1.self_attn.k_proj")
    sliced_a, sliced_b = k_proj.sliced_projections(torch.device("cpu"))
    assert torch.equal(sliced_a, shared.vera_A[:, :64]) and torch.equal(sliced_b, shared.vera_B[:32])


def test_projections_are_hf_peft_seeded_draws(load_base):
    from peft import VeraConfig, get_peft_model

    for key in (0, 1234):
        ours = load_base()
        apply_adapter(ours, VeraParams(r=16, projection_prng_key=key))
        theirs = get_peft_model(
            load_base(), VeraConfig(r=16, projection_prng_key=key, target_modules="all-linear")
        ).base_model
        assert torch.equal(ours.vera_projections.vera_A, theirs.vera_A["default"])
        assert torch.equal(ours.vera_projections.vera_B, theirs.vera_B["default"])
    other = load_base()
    apply_adapter(other, VeraParams(r=16, projection_prng_key=1))
    assert not torch.equal(other.vera_projections.vera_A, ours.vera_projections.vera_A)


def test_saved_keys_follow_hf_peft(load_base, tmp_path):
    model = load_base()
    apply_adapter(model, VeraParams(r=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "with", base_model_name_or_path="tiny")
    saved = load_file(str(tmp_path / "with" / WEIGHTS_NAME))
    assert sorted(saved) == [
        "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b",
        "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d",
        "base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_b",
        "base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_d",
        "base_model.vera_A",
        "base_model.vera_B",
    ]
    assert torch.equal(saved["base_model.vera_A"], model.vera_projections.vera_A)

    lean = load_base()
    apply_adapter(lean, VeraParams(r=8, target_modules=["q_proj"], save_projection=False))
    save_adapter(lean, tmp_path / "without", base_model_name_or_path="tiny")
    assert not any("vera_A" in k for k in load_file(str(tmp_path / "without" / WEIGHTS_NAME)))


def test_missing_projections_are_an_error_when_the_config_says_saved(load_base, tmp_path):
    model = load_base()
    apply_adapter(model, VeraParams(r=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["base_model.vera_B"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="save_projection: true but the file lacks base_model.vera_B"):
        load_adapter(load_base(), tmp_path)


def test_saved_projections_win_over_the_seed(load_base, input_ids, tmp_path):
    model = load_base()
    apply_adapter(model, VeraParams(r=8, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        model.vera_projections.vera_A.mul_(-2.0)  # as if drawn on another system
    perturb(model, 0, scale=0.05)
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    loaded = load_base()
    load_adapter(loaded, tmp_path)
    assert max_diff(logits(loaded, input_ids), expected) < TOL


CASES = {
    "q_v": dict(r=8, target_modules=["q_proj", "v_proj"]),
    "all-linear": dict(r=16, projection_prng_key=7, d_initial=0.2),
    "no-projection": dict(r=8, save_projection=False, target_modules=["k_proj", "down_proj"]),
    "dropout": dict(r=4, dropout=0.2, target_modules=["gate_proj"]),
}


@pytest.mark.parametrize("params", list(CASES.values()), ids=list(CASES))
def test_interop_with_hf_peft_both_ways(load_base, input_ids, tmp_path, params):
    from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = load_base()
    apply_adapter(model, VeraParams(**params))
    perturb(model, 1, scale=0.05)
    ours = logits(model, input_ids)
    assert max_diff(ours, logits(load_base(), input_ids)) > 1e-3
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(load_base(), tmp_path / "ours").eval()
    assert set(get_peft_model_state_dict(theirs)) == set(load_file(str(tmp_path / "ours" / WEIGHTS_NAME)))
    assert max_diff(logits(theirs, input_ids), ours) < TOL

    config = PeftConfig.from_pretrained(tmp_path / "ours")
    config.inference_mode = False
    hf = get_peft_model(load_base(), config).eval()
    perturb(hf, 2, scale=0.05)
    expected = logits(hf, input_ids)
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_base()
    load_adapter(loaded, tmp_path / "theirs")
    assert max_diff(logits(loaded, input_ids), expected) < TOL


def test_bert_sequence_classifier_interop(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def bert():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()

    ids = torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(3))
    model = bert()
    info = apply_adapter(model, VeraParams(r=8), AdapterContext(task="seq_cls"))
    assert "bert.pooler.dense" in info.targeted and "classifier" not in info.targeted
    perturb(model, 4, scale=0.05)
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    theirs = PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert max_diff(logits(theirs, ids), ours) < TOL


def test_hf_options_we_cannot_reproduce_are_refused(load_base, tmp_path):
    model = load_base()
    apply_adapter(model, VeraParams(r=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "bias": "vera_only"}))
    with pytest.raises(AdapterError, match="bias"):
        load_adapter(load_base(), tmp_path)


def test_merge_unmerge_and_half_precision(load_base, tiny_model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = load_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, VeraParams(r=8))
    perturb(model, 5, scale=0.2)
    unmerged = logits(model, input_ids)
    merge_adapter(model)
    merge_adapter(model)
    assert max_diff(logits(model, input_ids), unmerged) < 1e-4
    unmerge_adapter(model)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert max(max_diff(after[k], v) for k, v in before.items()) < 1e-5

    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    apply_adapter(half, VeraParams(r=8, target_modules=["q_proj"]))
    perturb(half, 6, scale=0.05)
    assert half.vera_projections.vera_A.dtype == torch.float32
    assert half.get_submodule("model.layers.0.self_attn.q_proj").vera_lambda_b.dtype == torch.float32
    out = logits(half, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
