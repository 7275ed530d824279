"""Packing and the chunked loss: the same per-token losses and gradients as plain padded batches with full
logits, on the tiny Llama (untied, tied), SmolLM2 (tied) and families that transform their logits; and the
start-up probe that refuses a leaking backend or falls back from a chunked loss that disagrees.

Tolerances (fp32): packing changes only the shape of the attention computation and the chunked loss only the
order of the head's reductions, so differences are rounding, ~1e-7 relative per operation. Measured: at most
~2e-6 of the largest logit on SmolLM2 (30 layers of it), and gradients within ~1e-6 relative. The bounds
below leave a 10-50x margin and stay far below what a leak between examples (order-one changes) produces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.masking_utils
from transformers import AutoConfig, AutoModelForCausalLM

from peftcli.data.collate import PadCollator
from peftcli.data.formats import IGNORE_INDEX
from peftcli.data.packing import PackedDataset
from peftcli.data.prepare import prepare_data
from peftcli.errors import PeftCliError
from peftcli.examples.assets import cache_dir
from peftcli.models.load import load_tokenizer
from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.fast_path import packing_wanted
from peftcli.train.head_loss import OutputHead
from peftcli.train.loop import SilentReporter, train
from peftcli.train.objective import TaskObjective
from peftcli.tuners.adapter import apply_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import make_recipe, perturb

LOSS_TOLERANCE = 1e-4  # per-token loss, absolute (losses are a few nats)
GRAD_TOLERANCE = 5e-5  # |g - g_ref| / |g_ref| per parameter tensor


def _examples(recipe_dict: dict, count: int) -> tuple[list[dict], int]:
    recipe = validate_recipe_dict(recipe_dict, "test.yaml")
    tokenizer = load_tokenizer(recipe.model)
    train_set = prepare_data(recipe, tokenizer).train
    rows = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in train_set.select(range(count))]
    return rows, tokenizer.pad_token_id


def _adapted(model, **lora) -> torch.nn.Module:
    params = get_tuner("lora").params(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **lora})
    apply_adapter(model, params, AdapterContext(task="causal_lm"))
    perturb(model, seed=1, scale=0.05)  # B away from zero, so every adapter tensor gets a gradient
    return model


def _loss_and_grads(model, batch: dict, head: OutputHead | None):
    objective = TaskObjective("causal_lm", model.config, head)
    model.zero_grad(set_to_none=True)
    loss = objective.loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _assert_same_gradients(grads: dict, reference: dict) -> None:
    assert grads.keys() == reference.keys() and reference
    for name, ref in reference.items():
        assert ref.norm() > 0, name
        error = float((grads[name] - ref).norm() / ref.norm())
        assert error < GRAD_TOLERANCE, (name, error)


def _per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses[targets.flatten() != IGNORE_INDEX]


def _check_packed_equals_unpacked(model, examples: list[dict], pad_id: int, max_length: int) -> None:
    collate = PadCollator(pad_id)
    packed_set = PackedDataset({k: [e[k] for e in examples] for k in ("input_ids", "labels")}, max_length)
    assert len(packed_set) < len(examples)  # several examples share rows
    packed = collate([packed_set[i] for i in range(len(packed_set))])
    # The unpacked batch in the packed order, so per-token losses line up one to one.
    order = [i for row in packed_set.rows for i in row]
    plain = collate([examples[i] for i in order])

    with torch.no_grad():
        plain_tokens = _per_token_losses(model(**_inputs(plain)).logits, plain["labels"])
        packed_tokens = _per_token_losses(model(**_inputs(packed)).logits, packed["labels"])
    assert plain_tokens.shape == packed_tokens.shape
    assert float((plain_tokens - packed_tokens).abs().max()) < LOSS_TOLERANCE

    reference_loss, reference = _loss_and_grads(model, plain, None)
    for batch, head in ((packed, None), (packed, OutputHead(model)), (plain, OutputHead(model))):
        loss, grads = _loss_and_grads(model, batch, head)
        assert abs(loss - reference_loss) < LOSS_TOLERANCE * len(plain_tokens)
        _assert_same_gradients(grads, reference)


def _inputs(batch: dict) -> dict:
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def test_packed_rows_give_the_unpacked_losses_and_gradients_on_the_tiny_llama(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, data={"validation": None, "mask_prompt": False})
    examples, pad_id = _examples(recipe, 12)
    model = _adapted(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    _check_packed_equals_unpacked(model, examples, pad_id, max_length=64)


def test_packed_rows_give_the_unpacked_losses_and_gradients_on_smollm2(tmp_path, one_torch_thread):
    base = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    data = cache_dir() / "data" / "gsm8k" / "train.jsonl"
    recipe = make_recipe(tmp_path, base, data, data={"validation": None, "max_length": 512})
    recipe["data"]["train"]["columns"] = {"prompt": "question", "completion": "answer"}
    examples, pad_id = _examples(recipe, 3)
    model = _adapted(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), target_modules=["q_proj", "v_proj"]
    )
    assert model.config.tie_word_embeddings
    _check_packed_equals_unpacked(model, examples, pad_id, max_length=512)


@pytest.mark.parametrize(
    ("tied", "lora"),
    [
        (False, {"modules_to_save": ["lm_head"]}),  # a trained copy of the head
        (False, {"target_modules": ["q_proj", "v_proj", "lm_head"]}),  # LoRA on the head
        (True, {}),  # the head is the input embedding
        (True, {"target_modules": ["q_proj", "v_proj", "lm_head"]}),
    ],
    ids=["modules_to_save", "lora-head", "tied", "tied-lora-head"],
)
def test_chunked_loss_gradients_equal_full_logits(tmp_path, copy_data, tied, lora):
    from peftcli.examples.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", tie_word_embeddings=tied)
    recipe = make_recipe(tmp_path, model_dir, copy_data, data={"validation": None})
    examples, pad_id = _examples(recipe, 6)
    model = _adapted(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), **lora)
    trained_head = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert trained_head or not lora  # the head itself takes part in the gradient check
    batch = PadCollator(pad_id)(examples)
    reference_loss, reference = _loss_and_grads(model, batch, None)
    head = OutputHead(model)
    head.chunk_tokens = 7  # several chunks, recomputed in the backward pass
    loss, grads = _loss_and_grads(model, batch, head)
    assert abs(loss - reference_loss) < 1e-5 * abs(reference_loss)
    _assert_same_gradients(grads, reference)


def _tiny_family(model_type: str, **extra):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.5,  # logits of a few units, so the transforms change them markedly
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("gemma2", {"final_logit_softcapping": 0.5}),  # soft-capping far inside the logits' range
        ("cohere", {"logit_scale": 3.0}),
        ("granite", {"logits_scaling": 0.25}),
    ],
)
def test_chunked_loss_follows_logit_post_processing(model_type, extra):
    model = _adapted(_tiny_family(model_type, **extra), target_modules=["q_proj", "v_proj"])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 128, (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    reference_loss, reference = _loss_and_grads(model, batch, None)
    loss, grads = _loss_and_grads(model, batch, OutputHead(model))
    assert abs(loss - reference_loss) < 1e-5 * abs(reference_loss)
    _assert_same_gradients(grads, reference)
    # Without the transform the loss differs clearly: the test would catch a forgotten one.
    plain = OutputHead(model)
    plain.softcap = plain.multiply = plain.divide = None
    assert abs(_loss_and_grads(model, batch, plain)[0] - reference_loss) > 1e-2 * abs(reference_loss)


class _Plan(SilentReporter):
    def start(self, plan: dict) -> None:
        self.plan = plan


def test_probe_refuses_a_backend_that_lets_packed_examples_see_each_other(
    tmp_path, tiny_model_dir, copy_data, monkeypatch
):
    # A backend that ignores the restarting positions: plain causal attention over the whole row.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    out = tmp_path / "packed"
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, data={"packing": True}, output={"dir": str(out)})
    with pytest.raises(PeftCliError, match=r"data\.packing: .*tiny.* with attention sdpa lets packed examples") as info:
        train(validate_recipe_dict(recipe, "test.yaml"))
    assert info.value.exit_code == 2
    assert not out.exists()  # refused before the run directory was started
    # Unpacked runs (auto, on sdpa) are unaffected by the broken backend.
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 1})
    reporter = _Plan()
    train(validate_recipe_dict(recipe, "test.yaml"), reporter=reporter)
    assert reporter.plan["packing"] is False and reporter.plan["batches"] == "length-grouped"


def test_probe_falls_back_to_full_logits_when_the_chunked_loss_disagrees(
    tmp_path, tiny_model_dir, copy_data, monkeypatch
):
    original = OutputHead.logits
    monkeypatch.setattr(OutputHead, "logits", lambda self, hidden: original(self, hidden) * 1.5)
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 1})
    reporter = _Plan()
    train(validate_recipe_dict(recipe, "test.yaml"), reporter=reporter)
    assert reporter.plan["cross_entropy"] == "full"
    assert any("the loss uses full logits" in note for note in reporter.plan["notes"])

    recipe = make_recipe(
        tmp_path, tiny_model_dir, copy_data, training={"cross_entropy": "chunked"}, output={"dir": str(tmp_path / "b")}
    )
    with pytest.raises(PeftCliError, match="training.cross_entropy: chunked does not fit"):
        train(validate_recipe_dict(recipe, "test.yaml"))


@pytest.mark.parametrize(
    ("setting", "method", "attention", "packs"),
    [
        ("auto", "lora", "flash_attention_2", True),
        ("auto", "lora", "flex_attention", True),
        ("auto", "lora", "sdpa", False),  # a dense mask: length-grouped batches do better
        ("auto", "prompt_tuning", "flash_attention_2", False),  # cannot pack
        (True, "lora", "sdpa", True),
        (False, "lora", "flash_attention_2", False),
    ],
)
def test_when_auto_packs(tmp_path, tiny_model_dir, copy_data, setting, method, attention, packs):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, data={"packing": setting})
    recipe["method"] = {"name": method} if method != "lora" else recipe["method"]
    recipe = validate_recipe_dict(recipe, "test.yaml")
    assert packing_wanted(recipe, get_tuner(method).capabilities.packing, attention) is packs


def test_a_packed_run_reports_its_rows_and_takes_the_chunked_loss(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, data={"packing": True}, training={"max_steps": 2})
    reporter = _Plan()
    summary = train(validate_recipe_dict(recipe, "test.yaml"), reporter=reporter)
    plan = reporter.plan
    assert plan["packing"] is True and plan["cross_entropy"] == "chunked"
    assert plan["probe"]["packing_error"] < 1e-5 and plan["probe"]["chunked_error"] < 1e-5
    shares = plan["padding_share"]
    assert shares["packed"] < shares["random"]
    assert summary["steps"] == 2 and summary["packing"] is True
