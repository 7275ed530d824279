"""OFT: recipe rules, HF PEFT's parameter layout and numerics, interop both ways, merge/unmerge, dropout."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from peftcli.errors import AdapterError, PeftCliError
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.oft.layers import OftLinear, cayley_neumann
from peftcli.tuners.oft.spec import OftParams
from peftcli.tuners.protocol import AdapterContext

from support import logits, max_diff, perturb

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in tiny"),
]
TOL = 1e-5


# --- recipe rules ------------------------------------------------------------------------------------------------


def test_r_alone_derives_block_size_and_defaults_use_block_size():
    assert (OftParams().r, OftParams().block_size) == (0, 32)
    assert (OftParams(r=4).r, OftParams(r=4).block_size) == (4, 0)
    assert OftParams(r=0, block_size=16).block_size == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=4, block_size=16), "either r .4. or block_size .16., not both"),
        (dict(r=0, block_size=0), "r and block_size are both 0"),
        (dict(block_size=1), "block of size 1"),
        (dict(r=-1), "greater than or equal to 0"),
        (dict(num_cayley_neumann_terms=0), "greater than or equal to 1"),
        (dict(module_dropout=1.0), "less than 1"),
    ],
)
def test_invalid_settings_fail_when_the_recipe_loads(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        OftParams(**kwargs)


def test_block_size_must_divide_each_layer_and_the_error_names_it(load_base):
    with pytest.raises(
        PeftCliError, match=r"method.block_size: 48 does not fit model.layers.0.self_attn.q_proj"
    ) as exc:
        apply_adapter(load_base(), OftParams(block_size=48))
    assert "2, 4, 8, 16, 32, 64" in str(exc.value)
    with pytest.raises(PeftCliError, match=r"method.r: 3 does not fit .*valid r values there are 1, 2, 4, 8, 16, 32"):
        apply_adapter(load_base(), OftParams(r=3))


def test_every_option_is_described_and_defaults_apply_on_the_meta_device(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert all(field.description for field in OftParams.model_fields.values())
    with torch.device("meta"):  # as `peft targets` and `peft methods` build models: no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    info = apply_adapter(model, OftParams(), AdapterContext(total_steps=100))
    assert len(info.targeted) == 14 and info.trainable_count(model) > 0


# --- layout and numerics ------------------------------------------------------------------------------------------


def test_parameters_store_the_upper_triangle_of_each_block(load_base):
    model = load_base()
    info = apply_adapter(model, OftParams(block_size=16, target_modules=["q_proj", "down_proj"]))
    named = dict(model.named_parameters())
    assert info.param_names == [n for n in named if n.endswith("oft_R.weight")]
    assert named["model.layers.0.self_attn.q_proj.oft_R.weight"].shape == (64 // 16, 16 * 15 // 2)
    assert named["model.layers.0.mlp.down_proj.oft_R.weight"].shape == (128 // 16, 16 * 15 // 2)
    assert all(named[n].dtype == torch.float32 and not named[n].any() for n in info.param_names)  # zero: identity

    shared = load_base()
    apply_adapter(shared, OftParams(r=2, block_share=True, target_modules=["q_proj", "down_proj"]))
    named = dict(shared.named_parameters())
    assert named["model.layers.0.self_attn.q_proj.oft_R.weight"].shape == (1, 32 * 31 // 2)  # 64 / r=2
    assert named["model.layers.0.mlp.down_proj.oft_R.weight"].shape == (1, 64 * 63 // 2)  # 128 / r=2


def test_cayley_neumann_series_matches_hf_peft_for_every_length():
    from peft.tuners.oft.layer import OFTRotationModule

    gen = torch.Generator().manual_seed(0)
    entries = torch.randn(3, 6 * 5 // 2, generator=gen) * 0.1
    for terms in range(1, 8):
        theirs = OFTRotationModule(3, 15, 6, 18, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
        skew = theirs._pytorch_skew_symmetric(entries, 6)
        assert torch.equal(cayley_neumann(skew, terms), theirs._cayley_batch(entries, 6, True, terms)), terms


def test_rotations_are_orthogonal(load_base):
    model = load_base()
    apply_adapter(model, OftParams(use_cayley_neumann=False, target_modules=["q_proj"]))
    perturb(model, 0, scale=0.3)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    blocks = layer.oft_R.full_rotations()
    eye = torch.eye(32).expand_as(blocks)
    assert max_diff(blocks @ blocks.transpose(-1, -2), eye) < 1e-5  # exact Cayley: orthogonal
    assert max_diff(blocks, eye) > 1e-2  # and really a rotation


# --- HF PEFT interop ----------------------------------------------------------------------------------------------

CASES = {
    "default": dict(),
    "exact-cayley": dict(use_cayley_neumann=False),
    "r": dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    "block-share": dict(block_share=True, block_size=16),
    "neumann-3": dict(num_cayley_neumann_terms=3, target_modules=["o_proj", "up_proj"]),
    "coft": dict(coft=True, eps=1e-2, target_modules=["q_proj"]),
}


@pytest.mark.parametrize("params", list(CASES.values()), ids=list(CASES))
def test_interop_with_hf_peft_both_ways(load_base, input_ids, tmp_path, params):
    from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = load_base()
    apply_adapter(model, OftParams(**params))
    perturb(model, 1, scale=0.05)
    ours = logits(model, input_ids)
    assert max_diff(ours, logits(load_base(), input_ids)) > 1e-3
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(load_base(), tmp_path / "ours").eval()
    saved = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    their_state = get_peft_model_state_dict(theirs)
    assert set(their_state) == set(saved)
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
    info = apply_adapter(model, OftParams(block_size=16), AdapterContext(task="seq_cls"))
    assert "classifier" in info.head_modules
    perturb(model, 4, scale=0.05)
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert max_diff(logits(theirs, ids), ours) < TOL


def test_saved_config_is_hf_peft_oft_config(load_base, tmp_path):
    from peft import OFTConfig, PeftConfig

    model = load_base()
    apply_adapter(model, OftParams(r=4, target_modules=["q_proj"], use_cayley_neumann=False))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, OFTConfig)
    assert (config.r, config.oft_block_size, config.use_cayley_neumann) == (4, 0, False)
    assert config.target_modules == {"q_proj"}  # one suffix selects the q_proj of every layer
    # A peft_version >= 0.18 tells HF PEFT the Cayley-Neumann series is the current one (no warning on load).
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_version"] >= "0.18"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (dict(bias="oft_only"), "bias"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(peft_version="0.17.1", use_cayley_neumann=True), "PEFT < 0.18"),
        (dict(oft_block_size=None), "PEFT < 0.14"),
    ],
    ids=["bias", "layers_to_transform", "old-neumann", "old-layout"],
)
def test_hf_options_we_cannot_reproduce_are_refused(load_base, tmp_path, edit, message):
    model = load_base()
    apply_adapter(model, OftParams(target_modules=["q_proj"]))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    fresh = load_base()
    with pytest.raises(AdapterError, match=message):
        load_adapter(fresh, tmp_path)
    assert getattr(fresh, "peftcli_adapter", None) is None


# --- merge, dtype, dropout ----------------------------------------------------------------------------------------


def test_merge_unmerge_restores_base_weights(load_base, input_ids):
    model = load_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, OftParams(block_size=16))
    perturb(model, 5, scale=0.2)
    unmerged = logits(model, input_ids)
    merge_adapter(model)
    merge_adapter(model)  # idempotent
    assert max_diff(logits(model, input_ids), unmerged) < 1e-4
    unmerge_adapter(model)
    unmerge_adapter(model)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert max(max_diff(after[k], v) for k, v in before.items()) < 1e-5
    assert max_diff(logits(model, input_ids), unmerged) < 1e-4


def test_half_precision_base_keeps_fp32_adapter_and_base_dtype(tiny_model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    def adapted(dtype):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
        torch.manual_seed(0)
        apply_adapter(model, OftParams(target_modules=["q_proj", "down_proj"]))
        perturb(model, 6, scale=0.05)
        return model

    model = adapted(torch.bfloat16)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.oft_R.weight.dtype == torch.float32
    out = logits(model, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # What bf16 itself costs this model: the same adapted model computed in fp32 against the bf16 one.
    rounding = max_diff(out, logits(adapted(torch.float32), input_ids))
    assert rounding > 0
    merge_adapter(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    # Merging rounds each rotated weight to bf16 once more: within twice the model's own bf16 error.
    assert max_diff(logits(model, input_ids), out) <= 2 * rounding


def test_module_dropout_turns_blocks_into_the_identity_in_training_only(load_base, input_ids):
    model = load_base()
    apply_adapter(model, OftParams(block_size=8, module_dropout=0.5, target_modules=["q_proj"]))
    perturb(model, 7, scale=0.3)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, OftLinear)
    rotations = layer.oft_R.full_rotations()
    dropped = layer.oft_R._drop_blocks(rotations)
    identity = [torch.equal(block, torch.eye(8)) for block in dropped]
    assert sum(identity) == 4  # int(0.5 * 8 blocks)
    kept = [i for i, same in enumerate(identity) if not same]
    assert all(torch.equal(dropped[i], rotations[i]) for i in kept)
    model.eval()
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))
    model.train()
    torch.manual_seed(0)
    first = logits(model, input_ids)
    second = logits(model, input_ids)
    assert not torch.equal(first, second)
