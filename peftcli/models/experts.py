"""Mixture-of-experts models whose experts are fused 3-D parameters (Mixtral, Qwen2-MoE in transformers 5).

Such experts are one parameter per projection for all experts of a block, not a layer per expert, so a method
that wraps layers does not reach them. Users of MoE models most often complain that expert adapters are
silently missing; the plan says so instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of the fused expert parameters (3-D or more, inside an `experts` module)."""
    return [name for name, param in model.named_parameters() if param.dim() >= 3 and ".experts." in f".{name}"]


def experts_left_out(model: nn.Module, trained: Iterable[str]) -> str | None:
    """A note naming the fused expert parameters the adapter does not train; None when there are none."""
    trained = set(trained)
    left = [name for name in fused_expert_parameters(model) if name not in trained]
    if not left:
        return None
    kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in left}))
    return (
        f"the experts of this mixture-of-experts model are {len(left)} fused 3-D parameters ({kinds}), which no "
        "layer-wrapping method adapts: the adapter covers the attention, router and dense layers only "
        "(method full or freeze trains the experts themselves)"
    )
