"""The fast paths of causal-LM training, packing and the chunked loss, and the probe that checks them on the
real model before any step is taken.

Both depend on the model family honouring something: packing on the attention backend keeping packed
examples apart, the chunked loss on the logits coming from the output head as `train/head_loss.py` computes
them. New families can break either silently, so before training the probe runs a few real training
examples three ways, in eval mode and without gradients:

1. each example on its own, with full logits (the reference);
2. the same examples packed into one row, with full logits: must match 1, position by position;
3. the chunked loss's logits on the labelled positions: must match the full path's on the same batch.

A packing mismatch stops the run with a message that names the model and attention backend. A chunked-loss
mismatch falls back to full logits (with `cross_entropy: auto`, said in the plan) or stops the run (with
`cross_entropy: chunked`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftcli.data.collate import PadCollator
from peftcli.data.packing import PackedDataset, packed_row
from peftcli.errors import PeftCliError
from peftcli.train.head_loss import HeadUnsupported, OutputHead
from peftcli.train.losses import model_inputs, next_token_targets

PROBE_EXAMPLES = 4
# Allowed root-mean-square difference relative to the reference logits' (per example for packing). Measured
# on SmolLM2 with GSM8K rows of three examples: rounding gives 7e-7 in fp32 and 1.1e-2 in bf16, while a
# backend that lets packed examples attend to each other gives 0.49 to 0.63 in either.
TOLERANCE = {"full": 1e-4, "half": 0.1}


# Backends that run a packed row without a dense (length x length) mask: variable-length flash attention
# and flex attention's block mask. sdpa and eager build that mask, which on a CPU made packed rows of 512
# tokens slower and heavier than length-grouped batches of the same examples (bench/train_vs_hf.py: 65 s and
# 4.0 GB against 56 s and 2.7 GB on SmolLM2), while grouping left 0.3% padding anyway.
PACKING_BACKENDS = ("flash_attention_2", "flash_attention_3", "flex_attention")


def packing_wanted(recipe, capable: bool, attention: str | None) -> bool:
    """Whether the run packs: `data.packing: true` (validated against task and method), or auto: for causal_lm
    with a method that can pack, on an attention backend that packs without a dense mask."""
    setting = recipe.data.packing
    if setting == "auto":
        return recipe.model.task == "causal_lm" and capable and attention in PACKING_BACKENDS
    return bool(setting)


@dataclass
class ProbeResult:
    """What the probe measured: the relative logit differences, and whether each path may be used."""

    packing_error: float | None = None
    chunked_error: float | None = None
    chunked_unsupported: str | None = None


def relative_difference(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """|candidate - reference| over |reference|, both as root mean squares (robust to one unlucky rounding)."""
    reference = reference.float()
    return float((candidate.float() - reference).norm() / reference.norm().clamp(min=1e-6))


def probe_examples(train_set, packed: PackedDataset | None) -> tuple[list[dict], bool]:
    """A few real training examples, and whether they make a packed row to check: with packing, those of the
    first row that holds more than one; else (or when every row holds one) the first two examples."""
    row = None if packed is None else next((r for r in packed.rows if len(r) > 1), None)
    if row is not None:
        return [{"input_ids": packed.input_ids[i], "labels": packed.labels[i]} for i in row[:PROBE_EXAMPLES]], True
    first = [train_set[i] for i in range(min(2, len(train_set)))]
    return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in first], False


def _on(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def run_probe(
    model, head: OutputHead | None, examples: list[dict], packing: bool, pad_id: int, device, config
) -> ProbeResult:
    """Compare packed and chunked logits with the plain path's on `examples` (see the module docstring).

    Without packing, the chunked loss is checked on the examples as one padded batch."""
    result = ProbeResult()
    was_training = model.training
    model.eval()
    collate = PadCollator(pad_id)
    try:
        batch = _on(collate([packed_row(examples)] if packing else examples), device)
        full = model(**model_inputs(batch, "causal_lm", config)).logits
        if packing:
            errors, start = [], 0
            for example in examples:  # per example: a leak shows in every example but the first
                alone = _on(collate([example]), device)
                reference = model(**model_inputs(alone, "causal_lm", config)).logits[0]
                errors.append(relative_difference(full[0, start : start + len(reference)], reference))
                start += len(reference)
            result.packing_error = max(errors)
        if head is not None:
            try:
                hidden, _ = head.hidden_states(model, model_inputs(batch, "causal_lm", config), batch["labels"])
            except HeadUnsupported as exc:
                result.chunked_unsupported = str(exc)
            else:
                _, keep = next_token_targets(batch["labels"])
                result.chunked_error = relative_difference(head.logits(hidden[keep]), full[keep])
    finally:
        model.train(was_training)
    return result


def check_packing(result: ProbeResult, tolerance: float, model_name: str, backend: str) -> None:
    """Refuse a backend that lets packed examples see each other."""
    if result.packing_error is not None and result.packing_error > tolerance:
        raise PeftCliError(
            f"data.packing: {model_name} with attention {backend} lets packed examples attend to each other "
            f"(packed logits differ from separate ones by {result.packing_error:.2g} relative, allowed "
            f"{tolerance:g}); set data.packing: false (packing is on by default for causal_lm), or "
            "choose another model.attn_implementation"
        )


def use_chunked_loss(result: ProbeResult, tolerance: float, setting: str, model_name: str) -> tuple[bool, str | None]:
    """Whether the chunked loss is used, and the plan's note when auto falls back to full logits."""
    problem = result.chunked_unsupported
    if problem is None and result.chunked_error is not None and result.chunked_error > tolerance:
        problem = (
            f"its logits differ from the model's own by {result.chunked_error:.2g} relative (allowed "
            f"{tolerance:g}); the model transforms its logits in a way the chunked loss does not follow"
        )
    if problem is None:
        return True, None
    if setting == "chunked":
        raise PeftCliError(f"training.cross_entropy: chunked does not fit {model_name}: {problem}; use auto or full")
    return False, f"the loss uses full logits: the chunked loss does not fit {model_name} ({problem})"
