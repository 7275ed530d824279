"""Prompt tuning, P-tuning and prefix tuning: hooks on a plain transformers model, HF PEFT's numerics and format.

The generic contract suite (test_contract.py) covers the defaults on every model; here: the variants
(text init, LSTM encoder, prefix projection), generation, training through the hooks and the validation rules.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from peftcli.errors import PeftCliError
from peftcli.models.load import enable_activation_checkpointing
from peftcli.recipe.load import load_recipe
from peftcli.train.evaluate import generation_score
from peftcli.train.losses import decoder_inputs, token_loss_sums
from peftcli.tuners.adapter import WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from peftcli.tuners.p_tuning.spec import PTuningParams
from peftcli.tuners.prefix_tuning.spec import PrefixTuningParams
from peftcli.tuners.prompt_tuning.spec import PromptTuningParams
from peftcli.tuners.protocol import AdapterContext

from support import BERT_PREFIX_REFUSED, make_recipe, skip_where_hf_peft_predates_the_cache_rename, write_recipe

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning"),
]

V = 4  # virtual tokens in every test
VARIANTS = {
    "prompt": PromptTuningParams(num_virtual_tokens=V),
    "prompt-text": PromptTuningParams(num_virtual_tokens=V, init="text", init_text="copy the words"),
    "ptuning-mlp": PTuningParams(num_virtual_tokens=V, encoder_hidden_size=48),
    "ptuning-lstm": PTuningParams(
        num_virtual_tokens=V, encoder_reparameterization_type="lstm", encoder_num_layers=2, encoder_dropout=0.2
    ),
    "prefix": PrefixTuningParams(num_virtual_tokens=V),
    "prefix-projection": PrefixTuningParams(num_virtual_tokens=V, projection=True, encoder_hidden_size=24),
    "prompt-lm-head": PromptTuningParams(num_virtual_tokens=V, modules_to_save=["lm_head"]),
}
TASK_CLASSES = {
    "causal_lm": ("AutoModelForCausalLM", "tiny_model_dir"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "tiny_t5_dir"),
    "seq_cls": ("AutoModelForSequenceClassification", "tiny_bert_dir"),
}


@pytest.fixture
def load(request):
    """Fresh fp32 base models in eval mode: the tiny Llama (causal_lm), T5 (seq2seq) or BERT (seq_cls)."""
    import transformers

    def build(task: str = "causal_lm"):
        auto_class, fixture = TASK_CLASSES[task]
        path = request.getfixturevalue(fixture)
        return getattr(transformers, auto_class).from_pretrained(path, dtype=torch.float32).eval()

    return build


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def adapted(load, params, task: str = "causal_lm", tokenizer=None, seed: int = 7):
    """A base model with the method applied and its trainable parameters moved well away from their start."""
    model = load(task)  # first: building the tiny model (the first time in a session) draws random numbers
    torch.manual_seed(seed)  # the random initialisations, so two calls build the same adapter
    apply_adapter(model, params, AdapterContext(task=task, tokenizer=tokenizer))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def batch(task: str = "causal_lm") -> dict:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(5, 390, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as the training collator pads
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(5, 390, (2, 6), generator=gen)
    if task == "seq_cls":  # two segments, so the virtual tokens' token types matter
        inputs["token_type_ids"] = (torch.arange(10) >= 5).long().expand(2, -1)
    return inputs


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max difference {diff:g} > {atol:g}"


def tokenizer_for(name: str, tokenizer):
    return tokenizer if name == "prompt-text" else None


# --- forward through the hooks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "ptuning-lstm", "prefix-projection"])
def test_logits_keep_the_input_length_and_padding_does_not_leak(name, load):
    model = adapted(load, VARIANTS[name])
    inputs = batch()
    out = logits(model, inputs)
    assert out.shape[:2] == inputs["input_ids"].shape
    assert (out - logits(load(), inputs)).abs().max() > 1e-2  # the prompt changes the outputs
    # The padded row's real positions equal the same row run alone, unpadded: the mask covers the prompt.
    alone = logits(model, {"input_ids": inputs["input_ids"][1:, :7]})
    assert_close(out[1:, :7], alone, atol=1e-4)
    # Positional arguments reach the hooks as well, and tuple outputs are trimmed too.
    with torch.no_grad():
        assert_close(model(inputs["input_ids"], inputs["attention_mask"]).logits, out)
        assert_close(model(**inputs, return_dict=False)[0], out)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_labels_given_to_the_model_give_hf_peft_loss(name, load, tmp_path):
    from peft import PeftModel

    model = adapted(load, VARIANTS[name])
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == labels.shape[1]
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load(), tmp_path).eval()(**inputs, labels=labels)
    # For virtual tokens HF PEFT also scores the first real token (predicted from the last virtual one).
    assert abs(out.loss.item() - theirs.loss.item()) < 1e-5
    sums, counts = token_loss_sums(out.logits, labels)
    assert (abs(out.loss.item() - (sums.sum() / counts.sum()).item()) < 1e-5) == (name == "prefix")


def test_text_init_repeats_the_text_tokens(load, tokenizer):
    model = load()
    apply_adapter(model, VARIANTS["prompt-text"], AdapterContext(tokenizer=tokenizer))
    ids = tokenizer("copy the words")["input_ids"]
    expected_ids = (ids * V)[:V]
    table = model.prompt_encoder.embedding.weight
    assert table.dtype == torch.float32 and table.requires_grad
    assert_close(table.detach(), model.get_input_embeddings().weight[expected_ids], atol=0)


def test_text_init_without_a_tokenizer_is_a_clear_error(load):
    with pytest.raises(PeftCliError, match=r"method\.init: text initialisation needs the model's tokenizer"):
        apply_adapter(load(), VARIANTS["prompt-text"], AdapterContext())


def test_a_deep_copy_carries_its_own_prompt(load):
    model = adapted(load, VARIANTS["ptuning-mlp"])
    inputs = batch()
    before = logits(model, inputs)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.add_(1.0)
    assert_close(logits(twin, inputs), before)
    assert (logits(model, inputs) - before).abs().max() > 1e-3


def test_token_classification_is_refused(load):
    with pytest.raises(PeftCliError, match=r"model\.task: prompt_tuning supports causal_lm, seq_cls, seq2seq"):
        apply_adapter(load(), VARIANTS["prompt"], AdapterContext(task="token_cls"))


def test_prefix_on_a_t5_with_fewer_decoder_layers_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4)
    with pytest.raises(PeftCliError, match="as many decoder layers as encoder layers"):
        apply_adapter(T5ForConditionalGeneration(config), VARIANTS["prefix"], AdapterContext(task="seq2seq"))


# --- save, load, HF PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_saved_prompt_is_the_encoder_output_and_reloads(name, load, tokenizer, tmp_path):
    model = adapted(load, VARIANTS[name], tokenizer=tokenizer_for(name, tokenizer))
    inputs = batch()
    expected = logits(model, inputs)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    heads = ["base_model.lm_head.weight"] if name == "prompt-lm-head" else []  # HF PEFT's keys for prompt methods
    assert sorted(saved) == sorted(["prompt_embeddings", *heads])
    with torch.no_grad():
        assert_close(saved["prompt_embeddings"], model.prompt_encoder().float(), atol=0)
    fresh = load()
    load_adapter(fresh, tmp_path / "a")
    assert_close(logits(fresh, inputs), expected)
    reparametrised = name in ("ptuning-mlp", "ptuning-lstm", "prefix-projection")
    assert (fresh.prompt_encoder.loaded is not None) == reparametrised  # else the table is the parameter itself
    if reparametrised:  # the saved prompt is used as it is: the training-time encoder is bypassed
        with torch.no_grad():
            for param in fresh.prompt_encoder.parameters():
                param.add_(1.0)
        assert_close(logits(fresh, inputs), expected)
    save_adapter(fresh, tmp_path / "b", base_model_name_or_path="tiny")  # a loaded adapter saves the same tensor
    assert_close(load_file(str(tmp_path / "b" / WEIGHTS_NAME))["prompt_embeddings"], saved["prompt_embeddings"])


INTEROP = [
    ("prompt-text", "causal_lm"),
    ("prompt-lm-head", "causal_lm"),
    ("ptuning-lstm", "causal_lm"),
    ("prefix-projection", "causal_lm"),
    ("ptuning-lstm", "seq2seq"),
    ("prefix-projection", "seq2seq"),
    ("prompt", "seq_cls"),
    ("prefix-projection", "seq_cls"),
]


@pytest.mark.parametrize(("name", "task"), INTEROP, ids=[f"{n}-{t}" for n, t in INTEROP])
def test_hf_peft_interop_both_ways(name, task, load, tokenizer, tmp_path):
    from peft import PeftConfig, PeftModel, get_peft_model

    if name.startswith("prefix") and task == "seq_cls":
        skip_where_hf_peft_predates_the_cache_rename(BERT_PREFIX_REFUSED)
    inputs = batch(task)
    length = inputs["input_ids"].shape[1]

    def hf_logits(hf_model):
        out = logits(hf_model, inputs)
        return out[:, -length:] if task == "causal_lm" else out  # HF keeps the virtual positions

    ours = adapted(load, VARIANTS[name], task, tokenizer_for(name, tokenizer))
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(load(task), tmp_path / "ours").eval()
    assert_close(hf_logits(theirs), logits(ours, inputs))

    config = PeftConfig.from_pretrained(tmp_path / "ours")
    config.inference_mode = False  # HF's training-time encoder (MLP, LSTM), perturbed and saved as its output
    trained = get_peft_model(load(task), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    trained.eval()
    expected = hf_logits(trained)
    trained.save_pretrained(tmp_path / "theirs")
    mine = load(task)
    load_adapter(mine, tmp_path / "theirs")
    assert_close(logits(mine, inputs), expected, atol=5e-5)


def test_adapter_config_has_what_hf_peft_needs(load, tokenizer, tmp_path):
    model = adapted(load, VARIANTS["prefix-projection"])
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # The tiny Llama has 2 key/value heads of width 16: the prefix holds 32-wide keys and values per layer.
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is True
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 2, 2)
    assert config["encoder_hidden_size"] == 24 and config["num_transformer_submodules"] == 1


# --- generation ---------------------------------------------------------------------------------------------------


def greedy_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens from full forwards, positions counted over real tokens as `generate` counts them."""
    new = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = out[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(new, 1)


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 390, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 3), mask


@pytest.mark.parametrize("name", ["prompt", "ptuning-lstm", "prefix", "prefix-projection"])
def test_generate_equals_a_greedy_loop_without_cache(name, load):
    model = adapted(load, VARIANTS[name])
    ids, mask = left_padded_prompts()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=None
    )
    assert torch.equal(out[:, ids.shape[1] :], greedy_without_cache(model, ids, mask, 6))


@pytest.mark.parametrize(("name", "task"), [("prefix", "causal_lm"), ("prompt", "seq2seq"), ("prefix", "seq2seq")])
def test_generate_equals_hf_peft_generate(name, task, load, tmp_path):
    from peft import PeftModel

    if (name, task) == ("prefix", "causal_lm"):
        skip_where_hf_peft_predates_the_cache_rename(
            "HF peft's prefix-tuning generate gives other tokens than a greedy loop over its own forward"
        )
    model = adapted(load, VARIANTS[name], task)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(load(task), tmp_path).eval()
    ids = torch.randint(5, 390, (2, 8), generator=torch.Generator().manual_seed(4))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    kwargs.update(pad_token_id=3, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs), theirs.generate(**kwargs))


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq"])
def test_generation_score_answers_with_the_prompt(task, load, tokenizer):
    model = adapted(load, VARIANTS["prompt-text"], task, tokenizer)
    # The tiny T5 ties its head to the embeddings and starts decoding from the pad token, so it would only
    # ever repeat it: keep pad and end-of-text out of the answers, which then have something to compare.
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.eos_token_id]
    prompts = [[10, 11, 12, 13], [20, 21]]
    _, answers = generation_score(model, tokenizer, prompts, max_new_tokens=5, pattern=".")
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[0, 1:] if task == "seq2seq" else out[0, len(prompt) :]
        assert answer and answer == tokenizer.decode(new, skip_special_tokens=True)


# --- training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "task"),
    [(n, "causal_lm") for n in VARIANTS if n not in ("prompt-text", "prompt-lm-head")]
    + [("ptuning-mlp", "seq2seq"), ("prefix", "seq2seq")],
)
def test_a_few_steps_through_the_hooks_lower_the_loss(name, task, load):
    model = load(task)
    apply_adapter(model, VARIANTS[name], AdapterContext(task=task))
    model.eval()  # no dropout (T5 has some), so the descent is deterministic; gradients flow all the same
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05 if name.startswith(("prompt", "prefix")) else 0.01)
    inputs = batch(task)
    labels = inputs["input_ids"]
    if task == "seq2seq":
        labels = inputs.pop("decoder_input_ids")
        inputs["decoder_input_ids"] = decoder_inputs(labels, model.config.decoder_start_token_id, 3)
    losses = []
    for _ in range(12):
        out = model(**inputs, use_cache=False).logits
        sums, counts = token_loss_sums(out, labels, shift=task == "causal_lm")
        loss = sums.sum() / counts.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["prompt", "ptuning-mlp"])
def test_activation_checkpointing_gives_the_same_gradients(name, load):
    grads = []
    for checkpointing in (False, True):
        model = adapted(load, VARIANTS[name])
        if checkpointing:
            enable_activation_checkpointing(model)  # what the training loop does
        model.train()
        inputs = batch()
        sums, _ = token_loss_sums(model(**inputs, use_cache=False).logits, inputs["input_ids"])
        sums.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert_close(grads[1], grads[0], atol=1e-4)


# --- validation ---------------------------------------------------------------------------------------------------

INVALID = [
    (PromptTuningParams, {"num_virtual_tokens": 0}, "greater than 0"),
    (PromptTuningParams, {"init": "text"}, "init_text: required"),
    (PromptTuningParams, {"init": "text", "init_text": "  "}, "init_text: required"),
    (PromptTuningParams, {"init_text": "hello"}, "init_text: only used with init: text"),
    (PTuningParams, {"encoder_num_layers": 3}, "encoder_num_layers: only used by the lstm"),
    (PTuningParams, {"encoder_dropout": 0.1}, "encoder_dropout: only used between the lstm"),
    (
        PTuningParams,
        {"encoder_reparameterization_type": "lstm", "encoder_num_layers": 1, "encoder_dropout": 0.1},
        "set encoder_num_layers >= 2",
    ),
    (PTuningParams, {"encoder_reparameterization_type": "gru"}, "literal"),
    (PrefixTuningParams, {"encoder_hidden_size": 64}, "only used with projection: true"),
    (PrefixTuningParams, {"num_virtual_tokens": -1}, "greater than 0"),
]


@pytest.mark.parametrize(("params", "options", "message"), INVALID)
def test_invalid_options_are_refused(params, options, message):
    with pytest.raises(ValidationError, match=message):
        params(**options)


def test_recipe_refuses_activation_checkpointing_with_prefix_tuning(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"activation_checkpointing": True})
    recipe["method"] = {"name": "prefix_tuning", "num_virtual_tokens": 4}
    with pytest.raises(PeftCliError, match="training.activation_checkpointing: method prefix_tuning"):
        load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
