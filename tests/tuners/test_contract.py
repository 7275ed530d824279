"""The contract every registered method keeps, run for each method on each tiny model whose task it supports.

A method added to the registry gets this whole suite by registering: identity at initialisation, only the
adapter trainable, save -> fresh load, two adapters side by side, merge/unmerge, and HF PEFT interop both ways.
"""

from __future__ import annotations

import pytest
import torch

from peftcli.tuners.adapter import (
    adapter_info,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import all_tuners, get_tuner

from support import BERT_PREFIX_REFUSED, skip_where_hf_peft_predates_the_cache_rename

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

# Small settings so every method fits the tiny models (hidden 64) and runs in milliseconds; anything not
# listed uses the method's own defaults, which must work on every architecture it claims.
TINY_PARAMS: dict[str, dict] = {
    "lora": {"r": 4},
    "adalora": {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 10},
    "vera": {"r": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
}

# model fixture, transformers Auto class, task
MODELS = {
    "llama": ("tiny_model_dir", "AutoModelForCausalLM", "causal_lm"),
    "bert": ("tiny_bert_dir", "AutoModelForSequenceClassification", "seq_cls"),
    "t5": ("tiny_t5_dir", "AutoModelForSeq2SeqLM", "seq2seq"),
}


# Methods that need something a tiny model lacks; they refuse it with an error tested in their own file.
NOT_APPLICABLE = {("bitfit", "llama"), ("bitfit", "t5")}  # neither has bias parameters


def _cases(condition=lambda spec: True):
    cases = []
    for name, spec in all_tuners().items():
        for model_kind, (_, _, task) in MODELS.items():
            if (name, model_kind) in NOT_APPLICABLE:
                continue
            if task in spec.capabilities.task_types and condition(spec):
                cases.append(pytest.param(name, model_kind, id=f"{name}-{model_kind}"))
    return cases


def _params(name: str):
    spec = get_tuner(name)
    allowed = spec.params.model_fields
    return spec.params(**{k: v for k, v in TINY_PARAMS.get(name, {}).items() if k in allowed})


@pytest.fixture
def loader(request):
    """A function building a fresh fp32 base model of a kind, in eval mode."""
    import transformers

    def load(kind: str):
        fixture, auto_class, _ = MODELS[kind]
        path = request.getfixturevalue(fixture)
        return getattr(transformers, auto_class).from_pretrained(path, dtype=torch.float32).eval()

    return load


def _batch(kind: str) -> dict:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(5, 390, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # some padding, so masks are exercised
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        batch["decoder_input_ids"] = torch.randint(5, 390, (2, 5), generator=gen)
    return batch


@torch.no_grad()
def _logits(model, kind: str) -> torch.Tensor:
    batch = _batch(kind)
    logits = model(**batch).logits
    if kind == "llama":
        logits = logits[:, -batch["input_ids"].shape[1] :]  # HF PEFT keeps virtual-token positions; we don't
    return logits


def _apply(model, name: str, kind: str):
    return apply_adapter(model, _params(name), AdapterContext(task=MODELS[kind][2]))


def _perturb(model, seed: int) -> None:
    """Move every trainable parameter away from its initial value, so nothing passes by being at identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_((0.05 * noise).to(param.dtype))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max difference {diff:g} > {atol:g}"


@pytest.mark.parametrize(("name", "kind"), _cases(lambda s: s.capabilities.kind != "edits_inputs"))
def test_identity_at_init(name, kind, loader):
    base = loader(kind)
    expected = _logits(base, kind)
    model = loader(kind)
    _apply(model, name, kind)
    _close(_logits(model, kind), expected, atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), _cases())
def test_only_the_adapter_is_trainable(name, kind, loader):
    model = loader(kind)
    info = _apply(model, name, kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == info.param_names
    assert info.trainable_count(model) > 0
    if get_tuner(name).capabilities.kind != "trains_base":
        base_names = {n for n, _ in loader(kind).named_parameters()}
        # Wrapped base weights move (q_proj.weight -> q_proj.base_layer.weight) but stay frozen.
        frozen = {n.replace(".base_layer", "") for n, p in model.named_parameters() if not p.requires_grad}
        heads = set(info.head_modules)
        assert {n for n in base_names if n.split(".")[0] not in heads} <= frozen


@pytest.mark.parametrize(("name", "kind"), _cases())
def test_save_and_fresh_load_reproduce_outputs_side_by_side(name, kind, loader, tmp_path):
    expected = {}
    for seed in (1, 2):  # two different adapters, each loaded onto its own fresh base, next to each other
        model = loader(kind)
        _apply(model, name, kind)
        _perturb(model, seed)
        expected[seed] = _logits(model, kind)
        save_adapter(model, tmp_path / f"adapter{seed}", base_model_name_or_path="tiny")
    assert not torch.allclose(expected[1], expected[2])
    loaded = {}
    for seed in (1, 2):
        loaded[seed] = loader(kind)
        info = load_adapter(loaded[seed], tmp_path / f"adapter{seed}")
        assert not any(p.requires_grad for p in loaded[seed].parameters()), "a loaded adapter is for inference"
        assert info.method == name
    for seed in (1, 2):
        _close(_logits(loaded[seed], kind), expected[seed], atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kind"), _cases(lambda s: s.capabilities.mergeable and s.capabilities.kind == "wraps_layers")
)
def test_merge_unmerge_and_idempotent_merge(name, kind, loader):
    model = loader(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    info = _apply(model, name, kind)
    _perturb(model, 3)
    unmerged = _logits(model, kind)
    merge_adapter(model)
    merged = _logits(model, kind)
    _close(merged, unmerged, atol=1e-4)
    merge_adapter(model)  # a second merge must not add the update again
    _close(_logits(model, kind), unmerged, atol=1e-4)
    unmerge_adapter(model)
    _close(_logits(model, kind), unmerged, atol=1e-4)
    # The base weights are back: compare every wrapped layer's base tensors with the originals.
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    heads = set(info.head_modules)
    for key, original in base_state.items():
        if key.split(".")[0] in heads or key not in restored:
            continue
        _close(restored[key].float(), original.float(), atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), _cases(lambda s: not s.capabilities.mergeable))
def test_merge_is_refused_with_a_reason(name, kind, loader):
    from peftcli.errors import AdapterError

    model = loader(kind)
    _apply(model, name, kind)
    with pytest.raises(AdapterError, match=f"method {name} cannot be merged: .+"):
        merge_adapter(model)
    assert get_tuner(name).merge_refusal, "say why it cannot merge and what to do instead"


@pytest.mark.parametrize(("name", "kind"), _cases(lambda s: s.in_hf_peft))
def test_our_adapter_loads_in_hf_peft(name, kind, loader, tmp_path):
    from peft import PeftModel

    if (name, kind) == ("prefix_tuning", "bert"):
        skip_where_hf_peft_predates_the_cache_rename(BERT_PREFIX_REFUSED)
    model = loader(kind)
    _apply(model, name, kind)
    _perturb(model, 4)
    expected = _logits(model, kind)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(loader(kind), tmp_path).eval()
    _close(_logits(theirs, kind), expected, atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), _cases(lambda s: s.in_hf_peft))
def test_hf_peft_adapter_loads_in_ours(name, kind, loader, tmp_path):
    from peft import PeftConfig, get_peft_model

    if (name, kind) == ("prefix_tuning", "bert"):
        skip_where_hf_peft_predates_the_cache_rename(BERT_PREFIX_REFUSED)
    model = loader(kind)
    _apply(model, name, kind)
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    config = PeftConfig.from_pretrained(tmp_path / "ours")
    config.inference_mode = False  # so HF builds its training-time layers, which we then perturb
    theirs = get_peft_model(loader(kind), config).eval()
    _perturb(theirs, 5)
    expected = _logits(theirs, kind)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = loader(kind)
    info = load_adapter(ours, tmp_path / "theirs")
    assert adapter_info(ours) is info and info.method == name
    _close(_logits(ours, kind), expected, atol=1e-5)


def test_every_method_is_covered_by_the_suite():
    """Each method claims causal LM and runs the suite on at least one tiny model."""
    missing = [n for n, s in all_tuners().items() if "causal_lm" not in s.capabilities.task_types]
    assert not missing, f"methods without causal_lm support: {missing}"
    covered = {case.values[0] for case in _cases()}
    assert covered == set(all_tuners())
