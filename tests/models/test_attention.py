"""model.attn_implementation: auto picks what the model supports; an explicit choice is passed as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftcli.errors import ModelError
from peftcli.models.load import load_base_model
from peftcli.recipe.schema import ModelSection


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma2: soft-capped attention, no sdpa in transformers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("gemma2") / "model")


@pytest.fixture(scope="module")
def tiny_deberta_dir(tmp_path_factory) -> Path:
    """A tiny random DeBERTa-v2 classifier: no sdpa either."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(DebertaV2ForSequenceClassification(config), tmp_path_factory.mktemp("deberta") / "model")


def _section(path: Path, task: str = "causal_lm", attention: str = "auto") -> ModelSection:
    return ModelSection(name_or_path=str(path), task=task, dtype="fp32", attn_implementation=attention)


def test_auto_is_the_default():
    assert ModelSection(name_or_path="x").attn_implementation == "auto"


@pytest.mark.parametrize(
    ("fixture", "task", "expected"),
    [("tiny_gemma2_dir", "causal_lm", "eager"), ("tiny_deberta_dir", "seq_cls", "eager"),
     ("tiny_model_dir", "causal_lm", "sdpa"), ("tiny_bert_dir", "seq_cls", "sdpa")],
)  # fmt: skip
def test_auto_loads_each_family_with_what_it_supports(fixture, task, expected, request):
    model = load_base_model(_section(request.getfixturevalue(fixture), task))
    assert model.config._attn_implementation == expected
    logits = model.eval()(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_an_explicit_implementation_the_model_lacks_is_a_clear_error(tiny_gemma2_dir):
    with pytest.raises(
        ModelError, match=r"^model.attn_implementation: Gemma2ForCausalLM does not support sdpa; use auto"
    ):
        load_base_model(_section(tiny_gemma2_dir, attention="sdpa"))
