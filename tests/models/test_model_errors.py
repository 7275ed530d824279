"""A damaged or misplaced base model is refused in one line naming model.name_or_path, the path and the cause.

Tiny random models are saved to disk and then damaged: tensors removed from or added to model.safetensors,
config.json edited, files left out. Positive controls: tied embeddings (lm_head absent from the file) and a
classifier built from a causal-LM checkpoint (its own head dropped, the new one initialised) still load.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.errors import ModelError
from peftcli.examples.tiny import build_tokenizer, write_tiny_model
from peftcli.models.load import build_empty_model, load_base_model, load_tokenizer, planned_attention
from peftcli.recipe.schema import ModelSection

from support import make_recipe, run_cli, write_recipe

# --- tiny models and their damaged copies ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama with tie_word_embeddings (SmolLM2-style): no lm_head.weight in the file."""
    return write_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (Conv1D layers, tied embeddings, `transformer.` body) with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = build_tokenizer()
    ids = {key: tokenizer.convert_tokens_to_ids(tokenizer.eos_token) for key in ("bos_token_id", "eos_token_id")}
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer), **ids)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def damaged(src: Path, dst: Path, drop: str = "", add: dict | None = None, config: dict | None = None) -> Path:
    """A copy of a model directory with the tensors under `drop` removed, `add` added, config.json updated."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors = {key: value for key, value in tensors.items() if not (drop and key.startswith(drop))}
    save_file({**tensors, **(add or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        values = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**values, **config}))
    return dst


def section(model_dir: Path | str, task: str = "causal_lm", **extra) -> ModelSection:
    return ModelSection(name_or_path=str(model_dir), task=task, dtype="fp32", **extra)


def refused(model_dir: Path | str, task: str = "causal_lm", **kwargs) -> str:
    """load_base_model's one-line ModelError, checked to start with the key and the path."""
    with pytest.raises(ModelError) as caught:
        load_base_model(section(model_dir, task), **kwargs)
    message = str(caught.value)
    assert message.startswith(f"model.name_or_path: {model_dir}: "), message
    assert "\n" not in message
    return message


# --- 1. missing weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", [None, {"": "cpu"}], ids=["plain", "device_map"])
def test_llama_missing_a_layer_names_the_missing_weights(tiny_model_dir: Path, tmp_path: Path, device_map) -> None:
    model_dir = damaged(tiny_model_dir, tmp_path / "m", drop="model.layers.1.")
    message = refused(model_dir, device_map=device_map)
    assert "the checkpoint lacks 9 weights the model needs (model.layers.1.input_layernorm.weight, " in message
    assert "and 6 more); it is incomplete or belongs to another architecture" in message


def test_gpt2_missing_a_layer_names_the_missing_weights(gpt2_dir: Path, tmp_path: Path) -> None:
    model_dir = damaged(gpt2_dir, tmp_path / "m", drop="transformer.h.1.")
    message = refused(model_dir)
    assert "lacks 12 weights the model needs (transformer.h.1.attn.c_attn.bias, " in message


def test_an_untied_lm_head_missing_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    message = refused(damaged(tiny_model_dir, tmp_path / "m", drop="lm_head."))
    assert "lacks 1 weight the model needs (lm_head.weight)" in message


def test_a_classifier_still_needs_every_body_weight(tied_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = damaged(tied_llama_dir, tmp_path / "m", drop="model.layers.1.")
    message = refused(model_dir, "seq_cls", label_names=["a", "b"])
    assert "lacks 9 weights" in message and "score" not in message  # the new head is expected to be missing


@pytest.mark.parametrize("fixture", ["tied_llama_dir", "gpt2_dir"])
def test_tied_embeddings_load_without_lm_head_in_the_file(fixture: str, request) -> None:
    model_dir = request.getfixturevalue(fixture)
    assert "lm_head.weight" not in load_file(str(model_dir / "model.safetensors"))
    model = load_base_model(section(model_dir))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("fixture", "task", "head"),
    [
        ("tiny_model_dir", "seq_cls", "score"),  # the checkpoint's untied lm_head.weight is dropped
        ("tiny_model_dir", "token_cls", "score"),
        ("tied_llama_dir", "seq_cls", "score"),
        ("gpt2_dir", "seq_cls", "score"),
        ("gpt2_dir", "token_cls", "classifier"),
    ],
)
def test_a_classifier_from_a_causal_lm_checkpoint_loads(fixture: str, task: str, head: str, request) -> None:
    model_dir = request.getfixturevalue(fixture)
    model = load_base_model(section(model_dir, task), label_names=["a", "b"])
    assert getattr(model, head).weight.shape[0] == 2


def test_bert_pooler_dropped_or_added_by_the_task_is_not_an_error(tiny_bert_dir, tiny_bert_token_dir) -> None:
    # A seq_cls checkpoint has a pooler the token classifier drops; a token_cls checkpoint has none to give.
    assert load_base_model(section(tiny_bert_dir, "token_cls"), num_labels=2).classifier.out_features == 2
    assert load_base_model(section(tiny_bert_token_dir, "seq_cls"), num_labels=2).classifier.out_features == 2


# --- 2. unexpected weights --------------------------------------------------------------------------------------


def _layer(model_dir: Path, source: int, target: int) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "model.safetensors"))
    old, new = f"model.layers.{source}.", f"model.layers.{target}."
    return {key.replace(old, new): value for key, value in tensors.items() if key.startswith(old)}


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_an_extra_layer_is_named(tiny_model_dir: Path, tmp_path: Path, task: str) -> None:
    model_dir = damaged(tiny_model_dir, tmp_path / "m", add=_layer(tiny_model_dir, 1, 2))
    message = refused(model_dir, task, **({"label_names": ["a", "b"]} if task == "seq_cls" else {}))
    assert "the checkpoint has 9 weights the model has no place for (model.layers.2.input_layernorm.weight, " in message
    assert "it holds more than config.json describes" in message


def test_a_lowered_layer_count_in_config_is_named(gpt2_dir: Path, tmp_path: Path) -> None:
    message = refused(damaged(gpt2_dir, tmp_path / "m", config={"n_layer": 1}))
    # 11, not 12: GPT-2's ignore pattern "attn.bias" (old mask buffers) matches c_attn.bias too, in transformers.
    assert re.search(r"has 1\d weights the model has no place for \(transformer\.h\.1\.attn\.", message)


def test_weights_of_another_architecture_are_refused(gpt2_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    shutil.copy(gpt2_dir / "model.safetensors", model_dir / "model.safetensors")
    message = refused(model_dir)
    assert re.search(r"lacks \d+ weights the model needs \(lm_head\.weight, model\.embed_tokens\.weight", message)
    assert re.search(r"and has \d+ weights the model has no place for \(transformer\.h\.0\.", message)
    assert message.endswith("the weights belong to another architecture than config.json describes")


# --- 3. shapes: config.json and weights disagree ----------------------------------------------------------------


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_an_edited_intermediate_size_names_the_first_mismatch(tiny_model_dir: Path, tmp_path: Path, task) -> None:
    model_dir = damaged(tiny_model_dir, tmp_path / "m", config={"intermediate_size": 96})
    message = refused(model_dir, task, **({"label_names": ["a", "b"]} if task == "seq_cls" else {}))
    assert (
        "config.json and the weights disagree: model.layers.0.mlp.down_proj.weight is [64, 128] in the checkpoint "
        "but [64, 96] in the model config.json describes (6 tensors differ)" in message
    )
    assert "look at the above report" not in message


def test_an_edited_hidden_size_is_named_for_gpt2(gpt2_dir: Path, tmp_path: Path) -> None:
    message = refused(damaged(gpt2_dir, tmp_path / "m", config={"n_embd": 48}))
    assert re.search(
        r"config\.json and the weights disagree: transformer\.\S+ is \[[\d, ]+\] in the checkpoint", message
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_load_checks_weights_too(tiny_model_dir: Path, tmp_path: Path, bits: int) -> None:
    pytest.importorskip("bitsandbytes")
    quantization = {"bits": bits, **({"compute_dtype": "fp32"} if bits == 4 else {})}
    for model_dir, expected in [
        (damaged(tiny_model_dir, tmp_path / "layer", drop="model.layers.1."), "lacks 9 weights"),
        # bitsandbytes quantizes a tensor of any shape; transformers compares none of them.
        (
            damaged(tiny_model_dir, tmp_path / "shape", config={"intermediate_size": 96}),
            "disagree: model.layers.0.mlp.down_proj.weight is [64, 128] in the checkpoint but [64, 96]",
        ),
    ]:
        with pytest.raises(ModelError, match=re.escape(expected)):
            load_base_model(section(model_dir, quantization=quantization), device_map={"": "cpu"})
        shutil.rmtree(model_dir)
    assert load_base_model(section(tiny_model_dir, quantization=quantization), device_map={"": "cpu"}) is not None


def test_a_gguf_file_loads_through_the_check(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from peftcli.export.gguf import write_gguf

    out = write_gguf(tiny_model_dir, tmp_path / "gguf" / "model.gguf", "f32")
    assert load_base_model(section(out)).config.num_hidden_layers == 2


# --- 4. empty directory, no config.json, no weights -------------------------------------------------------------


def _every_entry(name: Path | str):
    """Each way the model path is read first: planning (config), the tokenizer, the model."""
    return [
        lambda: planned_attention(section(name)),
        lambda: load_tokenizer(section(name)),
        lambda: load_base_model(section(name)),
    ]


def test_an_empty_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    for entry in _every_entry(tmp_path / "m"):
        with pytest.raises(ModelError, match=rf"^model\.name_or_path: {tmp_path}/m: the directory is empty; "):
            entry()


def test_a_directory_without_weights_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    expected = (
        f"model.name_or_path: {model_dir}: has no weights file (model.safetensors or pytorch_model.bin); "
        "it is not a complete model directory"
    )
    for entry in _every_entry(model_dir)[1:]:  # the config alone is enough to plan
        with pytest.raises(ModelError, match=f"^{re.escape(expected)}"):
            entry()
    assert build_empty_model(section(model_dir)) is not None  # `peft targets` reads the config only


def test_a_directory_without_config_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("config.json"))
    for entry in _every_entry(model_dir):
        with pytest.raises(ModelError, match=rf"^model\.name_or_path: {model_dir}: has no config\.json; it is not"):
            entry()


def test_the_folder_above_a_model_points_at_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "outer" / "model")
    message = refused(tmp_path / "outer")
    assert message.endswith(f"has no config.json; it is not a model directory (the folder holding config.json and "
                            f"the weights); did you mean {tmp_path / 'outer' / 'model'}?")  # fmt: skip


def test_an_adapter_directory_is_not_a_base_model(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert "holds an adapter (adapter_config.json), not a base model" in refused(tmp_path / "adapter")


# --- 5. a file instead of the model directory -------------------------------------------------------------------


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_a_file_in_a_model_directory_suggests_the_directory(tiny_model_dir: Path, file: str) -> None:
    expected = (
        f"model.name_or_path: {tiny_model_dir / file}: is a file; it must be a model directory (the folder "
        f"holding config.json and the weights) or a .gguf file; use its folder {tiny_model_dir}"
    )
    for entry in _every_entry(tiny_model_dir / file):
        with pytest.raises(ModelError, match=f"^{re.escape(expected)}$"):
            entry()


def test_a_stray_file_gets_no_folder_suggestion(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert refused(tmp_path / "weights.bin").endswith("or a .gguf file")


def test_a_tokenizer_file_is_named_by_model_tokenizer(tiny_model_dir: Path) -> None:
    file = tiny_model_dir / "tokenizer.json"
    with pytest.raises(ModelError, match=rf"^model\.tokenizer: {re.escape(str(file))}: is a file; .*use its folder"):
        load_tokenizer(section(tiny_model_dir, tokenizer=str(file)))


# --- the command line -------------------------------------------------------------------------------------------


def test_train_with_a_missing_layer_exits_2_naming_it(tiny_model_dir: Path, copy_data: Path, tmp_path: Path) -> None:
    model_dir = damaged(tiny_model_dir, tmp_path / "m", drop="model.layers.1.")
    recipe = write_recipe(tmp_path / "recipe.yaml", make_recipe(tmp_path, model_dir, copy_data))
    result = run_cli("train", str(recipe))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: model.name_or_path: {model_dir}: the checkpoint lacks 9 weights the model needs "
        "(model.layers.1.input_layernorm.weight, model.layers.1.mlp.down_proj.weight, "
        "model.layers.1.mlp.gate_proj.weight and 6 more); it is incomplete or belongs to another architecture: "
        "download or convert it again"
    ], result.stderr
