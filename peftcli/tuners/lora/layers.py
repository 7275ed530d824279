"""LoRA on nn.Linear: y = W x + (alpha / r) * B A dropout(x), with A and B kept in fp32."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcli.tuners.inject import find_targets, replace_module
from peftcli.tuners.lora.spec import SPEC, LoraParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank branch. Holds one adapter (the run's)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.merged = False
        self.reset_lora_parameters(init)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def reset_lora_parameters(self, init: str) -> None:
        """B = 0 so the layer starts as the identity; A kaiming-uniform (default) or N(0, 1/r) (gaussian)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, scaled, in fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight (once; merging twice is a no-op)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.data = (weight.data.float() + self.delta_weight()).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data = (weight.data.float() - self.delta_weight()).to(weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Compute the branch in the adapter's dtype, cast, then add: the order keeps half-precision error small.
        lora_dtype = self.lora_A.weight.dtype
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(lora_dtype)))) * self.scaling
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}"


def apply_method(model: nn.Module, params: LoraParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted linear layer of `model` in a LoraLinear."""
    targets = find_targets(model, params.target_modules, params.exclude_modules, SPEC.capabilities.layer_types, "lora")
    for name in targets:
        base = model.get_submodule(name)
        replace_module(
            model, name, LoraLinear(base, params.r, params.alpha, params.dropout, params.rslora, params.init)
        )
    return AppliedMethod(targets)


def merge_all(model: nn.Module) -> None:
    """Merge every LoRA layer of the model in place."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.merge()


def unmerge_all(model: nn.Module) -> None:
    """Undo `merge_all`."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.unmerge()
