"""The torch side LoHa and LoKr share (LyCORIS-style methods): a wrapper that adds ΔW·x to a frozen layer.

ΔW has the base weight's shape and is rebuilt from small trainable factors on every forward; each method says
how (`build_delta`). This module runs it with the base layer's own geometry (a linear map, or a convolution with
the base's stride, padding, dilation and groups), applies HF PEFT's training-time dropouts (rank dropout zeroes
whole output rows of ΔW, module dropout skips the update for a forward), and merges by adding ΔW to the base
weight. Factors are fp32 whatever the base dtype; the update is computed in fp32 and cast back before the add.

Kept torch-side only: the specs import nothing from here, so recipe validation stays torch-free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.quantized_layers import weight_shape
from peftcli.tuners.inject import find_targets, replace_module
from peftcli.tuners.lora.patterns import check_pattern_keys, pattern_value
from peftcli.tuners.protocol import AdapterLayer

LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")


def tucker_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A (out, in, kh, kw) kernel from a (r, r, kh, kw) core and (r, out), (r, in) factors (FedPara's Prop. 3)."""
    return torch.einsum("abhw,ao,bi->oihw", core, out_factor, in_factor)


class LycorisLayer(AdapterLayer):
    """A frozen Linear/Conv1d/Conv2d plus ΔW·x, ΔW = build_delta() reshaped to the base weight's shape."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        rank_dropout: float,
        module_dropout: float,
        rank_dropout_scale: bool,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.module_dropout = module_dropout
        self.merged = False

    def __getattr__(self, name: str):
        # Model code reads attributes of the layer it built (T5 reads wo.weight.dtype, convs their kernel_size).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def kernel(self) -> tuple[int, ...]:
        """The base weight's kernel dimensions: () for Linear, (k,) for Conv1d, (kh, kw) for Conv2d."""
        return tuple(weight_shape(self.base_layer)[2:])

    def add_factor(self, name: str, *shape: int) -> None:
        """Register a trainable fp32 factor on the base layer's device (values are set by the init)."""
        device = self.base_layer.weight.device
        self.register_parameter(name, nn.Parameter(torch.empty(*shape, device=device, dtype=torch.float32)))

    def factor(self, name: str) -> torch.Tensor | None:
        """A factor by name, or None when this layer's shape did not need it."""
        return self._parameters.get(name)

    def build_delta(self) -> torch.Tensor:
        """ΔW, scaled, in any shape with the base weight's number of elements."""
        raise NotImplementedError

    def delta_weight(self, rank_drop: bool = False) -> torch.Tensor:
        """ΔW in the base weight's shape, fp32; with `rank_drop`, rows dropped as HF PEFT does in training."""
        weight = self.build_delta().reshape(weight_shape(self.base_layer))
        if rank_drop:
            keep = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1))
        return weight

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight)
        conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        return conv(x, weight, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.training and self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
            return result
        weight = self.delta_weight(rank_drop=self.training and self.rank_dropout > 0)
        delta = self._apply_weight(x.to(weight.dtype), weight)
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (once; merging twice is a no-op)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.data = (weight.data.float() + self.delta_weight()).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data = (weight.data.float() - self.delta_weight()).to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, factors={sorted(self._parameters)}"


def kaiming_(tensor: torch.Tensor) -> None:
    """nn.Linear's default init (kaiming-uniform with a=sqrt(5)), as LoHa/LoKr use for their random factors."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def wrap_targets(model: nn.Module, params, method: str, make_layer) -> list[str]:
    """Find the targets, then wrap each in `make_layer(base, r, alpha)` with r/alpha from the patterns.

    'all-linear' takes linear layers only; named targets may also be Conv1d/Conv2d layers.
    """
    layer_types = ("Linear",) if params.target_modules == "all-linear" else LAYER_TYPES
    targets = find_targets(model, params.target_modules, params.exclude_modules, layer_types, method)
    check_pattern_keys(params, [name for name, _ in model.named_modules() if name])
    for name in targets:
        base = model.get_submodule(name)
        if getattr(base, "padding_mode", "zeros") != "zeros":
            raise PeftCliError(
                f"method.target_modules: {name} pads with {base.padding_mode!r}; {method} only supports "
                "zero-padded convolutions, so exclude it (method.exclude_modules)"
            )
        r = pattern_value(params.rank_pattern, name, params.r)
        alpha = pattern_value(params.alpha_pattern, name, params.alpha)
        replace_module(model, name, make_layer(base, r, alpha))
    return targets
