"""GPT-2-style models, whose linear layers are transformers' `Conv1D` (weight stored transposed): every method
that wraps linear layers adapts them, HF PEFT loads our adapters and we load theirs with equal logits, and the
streaming merge writes the weights back in the checkpoint's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from peftcli.examples.tiny import build_tokenizer
from peftcli.export.merge import merge_adapter_dir
from peftcli.tuners.adapter import apply_adapter, load_adapter, save_adapter
from peftcli.tuners.registry import get_tuner

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

ADAPTED = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
METHODS = {
    "lora": {"r": 4, "target_modules": "all-linear"},
    "dora": {"r": 4, "dora": True, "target_modules": ["c_attn", "c_proj", "c_fc"]},
    "ia3": {"target_modules": ["c_attn", "mlp.c_proj", "c_fc"], "feedforward_modules": ["mlp.c_proj"]},
    "loha": {"r": 4, "target_modules": ["c_attn", "c_fc"]},
    "lokr": {"r": 4, "target_modules": ["c_attn", "c_fc"]},
    "vera": {"r": 8, "target_modules": ["c_fc"]},
    "oft": {"target_modules": ["c_attn"]},
}
IN_HF_PEFT = ["lora", "dora", "ia3"]  # HF PEFT adapts Conv1D (fan_in_fan_out) for these


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (hidden 64, 2 layers), head tied to the embedding as GPT-2 ships."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _params(name: str):
    spec = get_tuner("lora" if name == "dora" else name)
    return spec.params(**METHODS[name])


def _logits(model) -> torch.Tensor:
    ids = torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _adapted(gpt2_dir: Path, name: str):
    model = _load(gpt2_dir)
    torch.manual_seed(0)
    info = apply_adapter(model, _params(name))
    _perturb(model, 4)
    return model.eval(), info


def test_all_linear_adapts_every_conv1d_but_not_the_head(gpt2_dir):
    model, info = _adapted(gpt2_dir, "lora")
    assert len(info.targeted) == 8 and set(ADAPTED) <= set(info.targeted) and "lm_head" not in info.targeted
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (layer.lora_A.weight.shape, layer.lora_B.weight.shape) == ((4, 64), (192, 4))  # HF PEFT's shapes


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_changes_the_model_and_merges_in_memory(name, gpt2_dir):
    from peftcli.tuners.adapter import merge_adapter

    model, info = _adapted(gpt2_dir, name)
    assert info.targeted
    before = _logits(model)
    assert (before - _logits(_load(gpt2_dir))).abs().max() > 1e-3
    merge_adapter(model)
    torch.testing.assert_close(_logits(model), before, atol=5e-5, rtol=0)  # fp32, logits about 1


@pytest.mark.parametrize("name", IN_HF_PEFT)
def test_hf_peft_loads_ours_and_we_load_theirs(name, gpt2_dir, tmp_path):
    from peft import PeftConfig, PeftModel, get_peft_model

    ours, _ = _adapted(gpt2_dir, name)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(gpt2_dir))
    theirs = PeftModel.from_pretrained(_load(gpt2_dir), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=0)

    config = PeftConfig.from_pretrained(tmp_path / "ours")
    assert config.fan_in_fan_out is True
    config.inference_mode = False
    trained = get_peft_model(_load(gpt2_dir), config)
    _perturb(trained, 9)
    trained.eval().save_pretrained(tmp_path / "theirs")
    mine = _load(gpt2_dir)
    load_adapter(mine, tmp_path / "theirs")
    torch.testing.assert_close(_logits(mine), _logits(trained), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "loha"])
def test_the_streaming_merge_writes_conv1d_weights_as_stored(name, gpt2_dir, tmp_path):
    from safetensors import safe_open

    model, _ = _adapted(gpt2_dir, name)
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(gpt2_dir))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(gpt2_dir)}}))
    merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape()) == (64, 192)
    torch.testing.assert_close(_logits(_load(tmp_path / "merged")), _logits(model), atol=5e-5, rtol=0)
