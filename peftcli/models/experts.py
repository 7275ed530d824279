"""Mixture-of-experts models whose experts are fused 3-D parameters (Mixtral, Qwen2-MoE in transformers 5).

Such experts are one parameter per projection for all experts of a block, not a layer per expert, so a method
that wraps layers does not reach them; LoRA adapts them when `target_parameters` names them. Users of MoE models
most often complain that expert adapters are silently missing; the plan says so instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _as_in_base(name: str) -> str:
    # An adapter's wrappers insert `base_layer` segments; the base model's name has none.
    return ".".join(part for part in name.split(".") if part != "base_layer")


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names (as in the base model) of the fused expert parameters: 3-D or more, inside an `experts` module."""
    return [
        _as_in_base(name) for name, param in model.named_parameters() if param.dim() >= 3 and ".experts." in f".{name}"
    ]


def experts_left_out(model: nn.Module, adapted: Iterable[str]) -> str | None:
    """A note naming the fused expert parameters the adapter neither trains nor adapts; None when there are none.

    `adapted`: the adapter's trained parameter names and the parameters it adapts directly.
    """
    adapted = {_as_in_base(name) for name in adapted}
    left = [name for name in fused_expert_parameters(model) if name not in adapted]
    if not left:
        return None
    kinds = sorted({name.rsplit(".", 1)[-1] for name in left})
    return (
        f"the experts of this mixture-of-experts model are {len(left)} fused 3-D parameters ({', '.join(kinds)}) "
        "that this adapter leaves out: it covers the attention, router and dense layers only. To adapt them, "
        f"use method lora with target_parameters: [{', '.join('experts.' + k for k in kinds)}] "
        "(or method full or freeze to train the experts themselves)"
    )


def checkpoint_rows(model: nn.Module, name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    """Where the rows of the fused expert parameter `name` (of `shape`) are stored in the model's checkpoints;
    None if it is stored as it is.

    transformers 5 fuses per-expert checkpoint tensors (Mixtral's `experts.3.w1.weight` and `w3`, Qwen2-MoE's
    `experts.3.gate_proj.weight`, ...) into one 3-D parameter when it loads, and splits them again when it
    saves. Its own reverse conversion is run on a tensor of row numbers (experts x rows x 1) instead of the
    weights: each checkpoint key gets the flat row numbers (expert·rows + row) it holds, in order. Only
    conversions that move whole rows are supported: anything else returns None.
    """
    from transformers.core_model_loading import revert_weight_conversion

    if len(shape) != 3:
        return None
    experts, rows = shape[:2]
    numbers = torch.arange(experts * rows).reshape(experts, rows, 1)
    try:
        split = revert_weight_conversion(model, {name: numbers})
    except Exception:  # noqa: BLE001 - a conversion this tensor cannot take: treat as not split
        return None
    if list(split) == [name]:
        return None
    if any(t.dim() != 2 or t.shape[1] != 1 or t.dtype != numbers.dtype for t in split.values()):
        return None
    found = {key: t[:, 0].contiguous() for key, t in split.items()}
    every = torch.cat(list(found.values())).sort().values
    return found if torch.equal(every, numbers.flatten()) else None  # each row stored exactly once
