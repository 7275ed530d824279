"""Models whose output head is tied to the input embedding (SmolLM2, Gemma, Qwen3, Llama-3.2): `modules_to_save:
[lm_head]` trains a separate copy of the head and saves it under HF PEFT's names, and LoRA on the embedding
leaves the head alone; HF PEFT loads both with our logits, and both merge into a model that unties the pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftcli.examples.tiny import write_tiny_model
from peftcli.export.merge import merge_adapter_dir
from peftcli.tuners.adapter import WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from peftcli.tuners.lora.spec import LoraParams

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

CASES = {
    "head-saved": LoraParams(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "embedding-adapted": LoraParams(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
}


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _trained(tied_dir: Path, params: LoraParams, steps: int = 3):
    """A model with the adapter trained a few steps (every adapter tensor moves, the base must not)."""
    model = _load(tied_dir)
    torch.manual_seed(0)
    apply_adapter(model, params)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.05)  # B starts at zero; start elsewhere so A gets gradients too
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_a_saved_head_is_a_separate_trained_copy(tied_dir):
    base = _load(tied_dir)
    model = _trained(tied_dir, CASES["head-saved"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the input stays the base
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert "lm_head.weight" in model.peftcli_adapter.param_names
    assert "model.embed_tokens.weight" not in model.peftcli_adapter.param_names


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_loads_our_adapter_with_our_logits(case, tied_dir, tmp_path):
    from peft import PeftModel

    model = _trained(tied_dir, CASES[case])
    save_adapter(model, tmp_path, base_model_name_or_path=str(tied_dir))
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    if case == "head-saved":
        assert "base_model.model.lm_head.weight" in keys
        assert not any("embed_tokens" in key for key in keys)
    theirs = PeftModel.from_pretrained(_load(tied_dir), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), atol=1e-5, rtol=0)  # fp32, logits about 5


@pytest.mark.parametrize("case", list(CASES))
def test_we_load_hf_peft_adapter_with_its_logits(case, tied_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    params = CASES[case]
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=params.target_modules, modules_to_save=params.modules_to_save or None
    )
    theirs = get_peft_model(_load(tied_dir), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = _load(tied_dir)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_the_merge_unties_the_pair_and_keeps_the_logits(case, tied_dir, tmp_path):
    model = _trained(tied_dir, CASES[case])
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(tied_dir))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tied_dir)}}))
    result = merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    assert any("tie_word_embeddings: false" in note for note in result.notes)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = _load(tmp_path / "merged")
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    # fp32 throughout: the merged weights differ from base + adapter by summation order only
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-4, rtol=0)
