"""The family matrix: tiny random models of the common families, each with the methods it supports, through
apply -> save -> HF PEFT load (logits equal) -> streaming merge -> plain transformers load (logits equal).

Every model is built from a transformers config (no weights to fetch): hidden 64, 2 layers. A cell either works
end to end or is refused before any work with a line that says why; `EXPECTED_REFUSALS` lists those.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from peftcli.errors import PeftCliError
from peftcli.export.merge import merge_adapter_dir
from peftcli.tuners.adapter import apply_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import skip_where_hf_peft_predates_the_cache_rename

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=400)
DECODER = dict(SMALL, num_key_value_heads=2, max_position_embeddings=128)
# family -> (config class, model class, task, config kwargs)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "causal_lm", DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "causal_lm", dict(DECODER, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "causal_lm", DECODER),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "causal_lm", dict(DECODER, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "causal_lm", dict(DECODER, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "causal_lm", dict(DECODER, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "causal_lm", dict(vocab_size=400, n_embd=64, n_layer=2, n_head=4)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        "causal_lm",
        dict(
            vocab_size=400,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        ),
    ),  # fmt: skip
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "causal_lm", dict(SMALL, max_position_embeddings=128)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "causal_lm", dict(DECODER, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        "causal_lm",
        dict(DECODER, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "seq_cls", dict(SMALL, num_labels=3)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", "seq_cls", dict(SMALL, num_labels=3)),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        "seq2seq",
        dict(
            vocab_size=400,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=128,
        ),
    ),  # fmt: skip
}
METHODS = {
    "lora": ("lora", {"r": 4}),
    "dora": ("lora", {"r": 4, "dora": True}),
    "ia3": ("ia3", {}),
    "loha": ("loha", {"r": 4}),
    "prompt": ("prompt_tuning", {"num_virtual_tokens": 4}),
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 4}),
    "bottleneck": ("bottleneck", {}),
}
# (family, method) -> what the refusal says; every other cell must work end to end. In transformers 5 the
# experts of Mixtral and Qwen2-MoE are fused 3-D parameters, not layers: IA3 and the bottleneck placement have
# no default there (LoRA's all-linear adapts their attention and dense layers).
NO_DEFAULT = "has no default targets for model type '{}'"
NO_PLACEMENT = "bottleneck has no built-in placement for model type '{}'"
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("mixtral", "ia3"): NO_DEFAULT.format("mixtral"),
    ("qwen2_moe", "ia3"): NO_DEFAULT.format("qwen2_moe"),
    ("mixtral", "bottleneck"): NO_PLACEMENT.format("mixtral"),
    ("qwen2_moe", "bottleneck"): NO_PLACEMENT.format("qwen2_moe"),
    ("deberta_v2", "bottleneck"): NO_PLACEMENT.format("deberta-v2"),
    ("deberta_v2", "prefix"): "DebertaV2ForSequenceClassification takes no cache; use prompt_tuning or p_tuning",
}
# Cells where HF PEFT itself cannot be the oracle (our side is still checked, and merged where it merges).
HF_PEFT_LACKS = {("gpt2", "loha"): "HF PEFT's LoHa refuses transformers' Conv1D layers"}


def _cases():
    for family in FAMILIES:
        for method in METHODS:
            yield pytest.param(family, method, id=f"{family}-{method}")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in made:
            import transformers

            config_class, model_class, _, kwargs = FAMILIES[family]
            torch.manual_seed(0)
            model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
            made[family] = tmp_path_factory.mktemp(family) / "model"
            model.save_pretrained(made[family])
        return made[family]

    return build


def _load(path: Path, task: str):
    from peftcli.models.load import auto_class

    return auto_class(task).from_pretrained(path, dtype=torch.float32).eval()


def _inputs(task: str) -> dict:
    ids = torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def _logits(model, task: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(task)).logits


@pytest.mark.parametrize(("family", "method"), list(_cases()))
def test_family_with_method(family, method, family_dir, tmp_path, one_torch_thread):
    from peft import PeftModel

    name, options = METHODS[method]
    spec = get_tuner(name)
    task = FAMILIES[family][2]
    if task not in spec.capabilities.task_types:
        pytest.skip(f"{name} does not claim {task}")
    base = family_dir(family)
    model = _load(base, task)
    torch.manual_seed(0)
    refusal = EXPECTED_REFUSALS.get((family, method))
    if refusal is not None:
        with pytest.raises(PeftCliError, match=refusal):
            apply_adapter(model, spec.params(**options), AdapterContext(task=task))
        return
    apply_adapter(model, spec.params(**options), AdapterContext(task=task))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    expected = _logits(model, task)
    assert (expected - _logits(_load(base, task), task)).abs().max() > 1e-4, "the adapter changes the model"
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(base))
    scale = max(expected.abs().max().item(), 1.0)
    if spec.in_hf_peft and (family, method) not in HF_PEFT_LACKS:
        if method == "prefix" and task == "seq_cls":
            skip_where_hf_peft_predates_the_cache_rename("HF peft refuses prefix tuning on encoders")
        theirs = PeftModel.from_pretrained(_load(base, task), run).eval()
        got = _logits(theirs, task)
        if task == "causal_lm":
            got = got[:, -expected.shape[1] :]  # HF PEFT keeps the virtual-token positions
        torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=0)  # fp32, same operations
    if spec.capabilities.mergeable:
        (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base), "task": task}}))
        merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
        merged = _load(tmp_path / "merged", task)
        # fp32; merged and unmerged differ by summation order only
        torch.testing.assert_close(_logits(merged, task), expected, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_plan_says_which_experts_an_adapter_leaves_out(family, family_dir):
    from peftcli.models.experts import experts_left_out

    model = _load(family_dir(family), "causal_lm")
    info = apply_adapter(model, get_tuner("lora").params(r=4), AdapterContext())
    note = experts_left_out(model, info.param_names)
    assert note is not None and "4 fused 3-D parameters (down_proj, gate_up_proj)" in note, note
    assert not any(".experts." in name for name in info.targeted)
    full = _load(family_dir(family), "causal_lm")
    trained = apply_adapter(full, get_tuner("full").params(), AdapterContext())
    assert experts_left_out(full, trained.param_names) is None
