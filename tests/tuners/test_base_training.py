"""Methods that train base tensors (BitFit, freeze tuning, full fine-tuning): selection, errors, save/load, ties."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from peftcli.errors import PeftCliError
from peftcli.examples.tiny import write_tiny_model
from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from peftcli.tuners.bitfit.spec import BitFitParams
from peftcli.tuners.freeze.layers import find_block_lists
from peftcli.tuners.freeze.spec import FreezeParams
from peftcli.tuners.full.spec import FullParams
from peftcli.tuners.protocol import AdapterContext, merge_layers, unmerge_layers
from peftcli.tuners.registry import get_tuner, load_implementation, tuner_for_peft_type

from support import logits, perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def trainable(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def round_trip(model, load, out, inputs, task="causal_lm"):
    """Save the (perturbed) adapter, load it onto a fresh base, check identical outputs; returns saved tensors."""
    expected = logits(model.eval(), **inputs)
    save_adapter(model, out, None)
    fresh = load()
    load_adapter(fresh, out)
    assert not any(p.requires_grad for p in fresh.parameters())
    got = logits(fresh.eval(), **inputs)
    assert torch.isfinite(got).all() and torch.equal(got, expected)
    return load_file(str(out / WEIGHTS_NAME))


@pytest.fixture
def load_bert(tiny_bert_dir):
    return lambda: AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()


@pytest.fixture
def load_t5(tiny_t5_dir):
    return lambda: AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir, dtype=torch.float32).eval()


@pytest.fixture
def bert_ids():
    return torch.randint(5, 400, (2, 10), generator=torch.Generator().manual_seed(7))


# --- shared: registry entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bitfit", "freeze", "full"])
def test_registered_as_trains_base(name):
    spec = get_tuner(name)
    caps = spec.capabilities
    assert caps.kind == "trains_base" and caps.mergeable and caps.zero3_safe and caps.layer_types == ()
    assert set(caps.task_types) == {"causal_lm", "seq_cls", "token_cls", "seq2seq"}
    assert not spec.in_hf_peft and spec.peft_type == f"PEFTCLI_{name.upper()}"
    assert tuner_for_peft_type(spec.peft_type) is spec
    implementation = load_implementation(name)
    # The trained base tensors are the result: there is nothing to fold in or take out.
    assert (implementation.merge_all, implementation.unmerge_all) == (merge_layers, unmerge_layers)
    for field_name, field in spec.params.model_fields.items():
        assert field.description, field_name


# --- BitFit ------------------------------------------------------------------------------------------------------


def test_bitfit_trains_every_bias_and_the_head(load_bert, bert_ids, tmp_path):
    model = load_bert()
    expected = logits(model, input_ids=bert_ids)
    info = apply_adapter(model, BitFitParams(), AdapterContext(task="seq_cls"))
    assert torch.equal(logits(model, input_ids=bert_ids), expected)  # nothing changed yet
    biases = [n for n in trainable(model) if not n.startswith("classifier.")]
    assert biases and all(n.endswith(".bias") for n in biases)
    assert len(biases) == sum(1 for n, _ in model.named_parameters() if n.endswith(".bias") and "classifier" not in n)
    assert any("LayerNorm" in n for n in biases)  # normalisation biases too
    assert {"classifier.weight", "classifier.bias"} <= set(info.param_names)
    assert "classifier" not in info.targeted
    perturb(model)
    saved = round_trip(model, load_bert, tmp_path / "a", {"input_ids": bert_ids})
    assert set(saved) == {f"base_model.model.{n}" for n in info.param_names}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.bias" in saved
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PEFTCLI_BITFIT" and config["task_type"] == "SEQ_CLS"


def test_bitfit_targets_all_linear_and_exclude(load_bert):
    info = apply_adapter(load_bert(), BitFitParams(target_modules=["query", "value"]), AdapterContext(task="seq_cls"))
    assert [n.rsplit(".", 1)[-1] for n in info.targeted] == ["query", "value"] * 2
    model = load_bert()
    info = apply_adapter(model, BitFitParams(target_modules="all-linear"), AdapterContext(task="seq_cls"))
    assert info.targeted and all(isinstance(model.get_submodule(n), nn.Linear) for n in info.targeted)
    model = load_bert()
    info = apply_adapter(model, BitFitParams(exclude_modules=r".*LayerNorm"), AdapterContext(task="seq_cls"))
    assert not any("LayerNorm" in n for n in info.targeted)


def test_bitfit_on_a_model_without_biases_suggests_another_method(load_base, load_t5):
    for model in (load_base(), load_t5()):
        with pytest.raises(PeftCliError, match=r"^method\.name: bitfit trains biases.*has none.*lora") as err:
            apply_adapter(model, BitFitParams())
        assert type(model).__name__ in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(target_modules=["qeury"]), "qeury matched nothing; modules with a bias: LayerNorm, dense, key"),
        (dict(exclude_modules=r".*"), "no bias left"),
    ],
)
def test_bitfit_target_errors(load_bert, kwargs, word):
    with pytest.raises(PeftCliError, match=word):
        apply_adapter(load_bert(), BitFitParams(**kwargs), AdapterContext(task="seq_cls"))


def test_bitfit_names_a_module_without_bias():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with pytest.raises(PeftCliError, match="0 has no bias in this model; modules with a bias: 1"):
        apply_adapter(model, BitFitParams(target_modules=["0"]))
    assert apply_adapter(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2)), BitFitParams()).targeted == ["1"]


def test_bitfit_token_classification(tiny_bert_token_dir, bert_ids, tmp_path):
    def load():
        return AutoModelForTokenClassification.from_pretrained(tiny_bert_token_dir, dtype=torch.float32).eval()

    model = load()
    apply_adapter(model, BitFitParams(), AdapterContext(task="token_cls"))
    perturb(model)
    round_trip(model, load, tmp_path / "a", {"input_ids": bert_ids})


def test_bitfit_recipe_rules():
    with pytest.raises(ValidationError, match="at least one"):
        BitFitParams(target_modules=[])
    with pytest.raises(ValidationError, match="r"):
        BitFitParams(r=4)


# --- freeze tuning -----------------------------------------------------------------------------------------------


def test_freeze_last_block(load_base, input_ids, tmp_path):
    model = load_base()
    info = apply_adapter(model, FreezeParams(layers=[-1]))
    assert info.targeted == ["model.layers.1"]
    assert trainable(model) == [n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")]
    perturb(model)
    saved = round_trip(model, load_base, tmp_path / "a", {"input_ids": input_ids})
    assert set(saved) == {f"base_model.model.{n}" for n in info.param_names}
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["layers"] == [-1]


def test_freeze_modules_within_blocks_and_extra_modules(load_base):
    model = load_base()
    info = apply_adapter(model, FreezeParams(layers=[0], modules=["mlp"], extra_modules=["embed_tokens", "norm"]))
    assert info.targeted == ["model.layers.0.mlp", "model.embed_tokens", "model.norm"]
    assert set(trainable(model)) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    model = load_base()
    apply_adapter(model, FreezeParams(layers=None, modules=["self_attn.q_proj", "input_layernorm"]))  # every block
    assert set(trainable(model)) == {
        f"model.layers.{i}.{part}.weight" for i in (0, 1) for part in ("self_attn.q_proj", "input_layernorm")
    }
    model = load_base()
    apply_adapter(model, FreezeParams(layers=[], extra_modules=["lm_head"]))
    assert trainable(model) == ["lm_head.weight"]


def test_freeze_defaults_train_the_last_two_blocks(load_base, load_t5):
    assert FreezeParams().layers == [-2, -1]
    assert apply_adapter(load_base(), FreezeParams()).targeted == ["model.layers.0", "model.layers.1"]
    info = apply_adapter(load_t5(), FreezeParams(), AdapterContext(task="seq2seq"))
    assert info.targeted == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_freeze_index_normalisation(load_base):
    model = load_base()
    assert apply_adapter(model, FreezeParams(layers=[1, -2])).targeted == ["model.layers.1", "model.layers.0"]
    model = load_base()
    assert apply_adapter(model, FreezeParams(layers=[0, -2])).targeted == ["model.layers.0"]  # same block once


@pytest.mark.parametrize(
    ("kwargs", "word", "key"),
    [
        (dict(layers=[2]), r"block 2 is out of range: the model has 2 layers in model\.layers", "layers"),
        (dict(layers=[-3]), "block -3 is out of range: the model has 2 layers", "layers"),
        (
            dict(layers=[0], modules=["feed_forward"]),
            "feed_forward matched nothing inside the chosen blocks",
            "modules",
        ),
        (dict(extra_modules=["embeddings"]), "embeddings matched no module", "extra_modules"),
    ],
)
def test_freeze_errors_on_the_model(load_base, kwargs, word, key):
    with pytest.raises(PeftCliError, match=word) as err:
        apply_adapter(load_base(), FreezeParams(**kwargs))
    assert str(err.value).startswith(f"method.{key}:")


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(layers=[]), "trains nothing"),
        (dict(layers=[], modules=["mlp"]), "layers is empty"),
        (dict(layers=[0, 0]), "listed twice"),
        (dict(layers=[0], modules=[]), "at least one module"),
        (dict(extra_modules=[""]), "must not be empty"),
        (dict(layers=["last"]), "layers"),
    ],
)
def test_freeze_recipe_rules(kwargs, word):
    with pytest.raises(ValidationError, match=word):
        FreezeParams(**kwargs)


def test_freeze_finds_block_lists_across_architectures(load_base, load_bert, load_t5, bert_ids, tmp_path):
    assert [name for name, _ in find_block_lists(load_base())] == ["model.layers"]
    assert [name for name, _ in find_block_lists(load_bert())] == ["bert.encoder.layer"]
    # T5: both stacks (each block's own `layer` list is not a stack)
    assert [name for name, _ in find_block_lists(load_t5())] == ["encoder.block", "decoder.block"]
    model = load_t5()
    info = apply_adapter(model, FreezeParams(layers=[-1]), AdapterContext(task="seq2seq"))
    assert info.targeted == ["encoder.block.1", "decoder.block.1"]
    gpt2_like = nn.Module()
    gpt2_like.transformer = nn.Module()
    gpt2_like.transformer.h = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert [name for name, _ in find_block_lists(gpt2_like)] == ["transformer.h"]

    model = load_bert()
    info = apply_adapter(model, FreezeParams(layers=[0], modules=["attention"]), AdapterContext(task="seq_cls"))
    assert info.targeted == ["bert.encoder.layer.0.attention"]
    assert {"classifier.weight", "classifier.bias"} <= set(info.param_names)
    perturb(model)
    round_trip(model, load_bert, tmp_path / "a", {"input_ids": bert_ids})


def test_freeze_without_block_list_is_a_clear_error():
    with pytest.raises(PeftCliError, match=r"^method\.layers: found no list of transformer blocks"):
        apply_adapter(nn.Sequential(nn.Linear(2, 2)), FreezeParams(layers=[0]))
    info = apply_adapter(nn.Sequential(nn.Linear(2, 2)), FreezeParams(layers=[], extra_modules=["0"]))
    assert info.targeted == ["0"]


# --- full fine-tuning --------------------------------------------------------------------------------------------


def test_full_trains_everything(load_base, input_ids, tmp_path):
    model = load_base()
    expected = logits(model, input_ids=input_ids)
    info = apply_adapter(model, FullParams())
    assert trainable(model) == [n for n, _ in model.named_parameters()]
    assert torch.equal(logits(model, input_ids=input_ids), expected)
    perturb(model)
    saved = round_trip(model, load_base, tmp_path / "a", {"input_ids": input_ids})
    assert set(saved) == {f"base_model.model.{n}" for n, _ in load_base().named_parameters()}
    assert "lm_head" in info.targeted


def test_full_exclude_modules(load_base):
    model = load_base()
    apply_adapter(model, FullParams(exclude_modules=["embed_tokens", "layers.0.mlp"]))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight"] + [
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")
    ]
    model = load_base()
    apply_adapter(model, FullParams(exclude_modules=r"model\.layers\..*"))
    assert trainable(model) == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def test_full_exclude_errors(load_base):
    with pytest.raises(PeftCliError, match=r"^method\.exclude_modules: embedding matched no module"):
        apply_adapter(load_base(), FullParams(exclude_modules=["embedding"]))
    with pytest.raises(PeftCliError, match="every parameter is excluded"):
        apply_adapter(load_base(), FullParams(exclude_modules=["model", "lm_head"]))
    with pytest.raises(ValidationError, match="not an exclusion"):
        FullParams(exclude_modules="all-linear")


def test_full_seq2seq_and_seq_cls(load_t5, load_bert, input_ids, bert_ids, tmp_path):
    model = load_bert()
    info = apply_adapter(model, FullParams(exclude_modules=["embeddings"]), AdapterContext(task="seq_cls"))
    assert "classifier" not in info.targeted and "classifier.weight" in info.param_names
    perturb(model)
    round_trip(model, load_bert, tmp_path / "bert", {"input_ids": bert_ids})
    model = load_t5()
    apply_adapter(model, FullParams(), AdapterContext(task="seq2seq"))
    perturb(model)
    ids = input_ids.clamp(min=5)
    round_trip(model, load_t5, tmp_path / "t5", {"input_ids": ids, "decoder_input_ids": ids[:, :4]})


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def test_full_keeps_tied_weights_one_tensor(tied_model_dir, input_ids, tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32).eval()

    model = load()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_adapter(model, FullParams())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor after training
    saved = round_trip(model, load, tmp_path / "a", {"input_ids": input_ids})
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.lm_head.weight" not in saved
    fresh = load()
    load_adapter(fresh, tmp_path / "a")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)

    # Excluding the embeddings freezes the tied head with them: they are one tensor.
    model = load()
    apply_adapter(model, FullParams(exclude_modules=["embed_tokens"]))
    assert not model.lm_head.weight.requires_grad


def test_freeze_extra_tied_embedding_saved_once(tied_model_dir, input_ids, tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32).eval()

    model = load()
    apply_adapter(model, FreezeParams(layers=[-1], extra_modules=["lm_head"]))
    perturb(model)
    saved = round_trip(model, load, tmp_path / "a", {"input_ids": input_ids})
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.lm_head.weight" not in saved


# --- all five methods of this group: recipes and the meta device ---------------------------------------------------

METHODS = {
    "ia3": {"name": "ia3"},
    "ln_tuning": {"name": "ln_tuning"},
    "bitfit": {"name": "bitfit", "target_modules": ["query"]},
    "freeze": {"name": "freeze", "layers": [-1], "modules": ["mlp"]},
    "full": {"name": "full", "exclude_modules": ["embed_tokens"]},
}


@pytest.mark.parametrize(
    ("method", "problem"),
    [
        (METHODS["ia3"], None),
        ({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
         "method.feedforward_modules: must be a subset of target_modules"),
        (METHODS["ln_tuning"], None),
        ({"name": "ln_tuning", "target_modules": "all-linear"}, "method.target_modules: 'all-linear' does not apply"),
        (METHODS["bitfit"], None),
        ({"name": "bitfit", "r": 8}, "method.r: unknown key"),
        (METHODS["freeze"], None),
        ({"name": "freeze", "layers": [1, 1]}, "method.layers: block index 1 is listed twice"),
        ({"name": "freeze", "layers": []}, "freeze trains nothing"),
        (METHODS["full"], None),
        ({"name": "full", "exclude_modules": []}, "method.exclude_modules: must name at least one"),
    ],
)  # fmt: skip
def test_recipes_validate(tmp_path, tiny_model_dir, copy_data, method, problem):
    from peftcli.errors import RecipeError
    from peftcli.recipe.load import validate_recipe_dict

    from support import make_recipe

    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data)
    recipe["method"] = method
    if problem is None:
        assert validate_recipe_dict(recipe, "r.yaml").method.name == method["name"]
    else:
        with pytest.raises(RecipeError) as err:
            validate_recipe_dict(recipe, "r.yaml")
        assert any(problem in line for line in err.value.lines()), err.value.lines()


@pytest.mark.parametrize("name", ["ia3", "ln_tuning", "freeze", "full"])
def test_apply_on_the_meta_device(tiny_model_dir, name):
    """`peft targets` applies methods to a weightless model: nothing may need real tensors."""
    from peftcli.models.load import build_empty_model
    from peftcli.recipe.schema import ModelSection
    from peftcli.tuners.registry import get_tuner

    model = build_empty_model(ModelSection(name_or_path=str(tiny_model_dir)))
    params = get_tuner(name).params(**{k: v for k, v in METHODS[name].items() if k != "name"})
    info = apply_adapter(model, params)
    assert info.targeted and info.trainable_count(model) > 0
    assert all(p.device.type == "meta" for p in model.parameters())
