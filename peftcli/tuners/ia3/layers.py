"""IA3 on nn.Linear and nn.Conv2d: y = l ⊙ (W x + b), or y = W (l ⊙ x) + b for feed-forward layers.

The vector `l` is an fp32 parameter named `ia3_l`, shaped as HF PEFT stores it: (out, 1) on a linear
layer's output, (1, in) on its input, (1, channels, 1, 1) on a convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import task_head_names
from peftcli.tuners.ia3.spec import DEFAULT_TARGETS, SPEC, IA3Params, is_feedforward
from peftcli.tuners.inject import find_targets, layer_classes, replace_module
from peftcli.tuners.protocol import AdapterContext, AdapterLayer, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import ALL_LINEAR, name_matches, short_names

# A vector entry this close to zero wipes its row/column out of the merged weight, so dividing it back out
# cannot restore the base; merge keeps a copy of the original weight then, and unmerge restores that copy.
NEAR_ZERO = 1e-6


class IA3Layer(AdapterLayer):
    """A frozen linear or 2-D convolution layer whose output (or input) is rescaled by a trainable vector."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, feedforward: bool, init: str = "ones"):
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        if isinstance(base_layer, nn.Conv2d):
            shape = (1, base_layer.in_channels if feedforward else base_layer.out_channels, 1, 1)
        else:
            shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        device = base_layer.weight.device
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32))
        if init == "random":
            nn.init.normal_(self.ia3_l)
        self.merged = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _activation_scale(self) -> torch.Tensor:
        # Linear activations carry features last; convolution activations are (N, C, H, W).
        return self.ia3_l if isinstance(self.base_layer, nn.Conv2d) else self.ia3_l.flatten()

    def _weight_scale(self) -> torch.Tensor:
        """The vector shaped to multiply the base weight (fp32, detached)."""
        vector = self.ia3_l.detach()
        base = self.base_layer
        if not isinstance(base, nn.Conv2d):
            return vector  # (out, 1) scales rows, (1, in) scales columns
        if not self.feedforward:
            return vector.reshape(-1, 1, 1, 1)
        groups = base.groups
        in_per_group, out_per_group = base.in_channels // groups, base.out_channels // groups
        # Each output channel sees only its group's slice of the input channels.
        scale = vector.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
        return scale.reshape(base.out_channels, in_per_group, 1, 1)

    def merge(self) -> None:
        """Fold the vector into the base weight (and bias, for output scaling); merging twice is a no-op."""
        if self.merged:
            return
        base = self.base_layer
        scales_bias = not self.feedforward and base.bias is not None
        with torch.no_grad():
            if (self.ia3_l.abs() < NEAR_ZERO).any():
                self._original = (base.weight.detach().clone(), base.bias.detach().clone() if scales_bias else None)
            base.weight.copy_(base.weight.float() * self._weight_scale())
            if scales_bias:
                base.bias.copy_(base.bias.float() * self.ia3_l.detach().flatten())
        self.merged = True

    def forget_unmerge_state(self) -> None:
        self._original = None

    def unmerge(self) -> None:
        """Divide the vector back out of the base weight (exact copy back where an entry was near zero)."""
        if not self.merged:
            return
        base = self.base_layer
        scales_bias = not self.feedforward and base.bias is not None
        with torch.no_grad():
            if self._original is not None:
                weight, bias = self._original
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
            else:
                base.weight.copy_(base.weight.float() / self._weight_scale())
                if scales_bias:
                    base.bias.copy_(base.bias.float() / self.ia3_l.detach().flatten())
        self._original = None
        self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self._activation_scale()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _layer_names(model: nn.Module, layer_types: tuple[str, ...] = SPEC.capabilities.layer_types) -> list[str]:
    """Names of the modules IA3 could wrap (task heads left out)."""
    heads = task_head_names(model)
    classes = layer_classes(layer_types)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, classes) and not any(name == h or name.startswith(h + ".") for h in heads)
    ]


def _resolve_defaults(model: nn.Module, params: IA3Params) -> tuple[list[str] | str, list[str] | str]:
    """The target spec and the feed-forward spec to use, filling in the architecture's defaults."""
    model_type = _model_type(model)
    default = DEFAULT_TARGETS.get(model_type or "")
    target = params.target_modules
    if target is None:
        if default is None:
            candidates = ", ".join(short_names(_layer_names(model))) or "none"
            raise PeftCliError(
                f"method.target_modules: ia3 has no default targets for model type {model_type!r}; "
                f"name the layers to rescale (and feedforward_modules), candidates: {candidates}"
            )
        target = default[0]
    feedforward = params.feedforward_modules
    if feedforward is None:
        feedforward = list(default[1]) if default is not None else []
    return target, feedforward


def _check_feedforward(
    params: IA3Params, feedforward: list[str] | str, targets: list[str], candidates: list[str]
) -> None:
    """feedforward_modules must name targeted modules only (recipe-level when both are lists, else here)."""
    if params.feedforward_modules is None:
        return  # architecture defaults: applied to the targeted modules they match, nothing else
    entries = [feedforward] if isinstance(feedforward, str) else feedforward
    probes = {e: [e] if isinstance(feedforward, list) else e for e in entries}
    unused = [e for e, probe in probes.items() if not any(is_feedforward(t, probe) for t in targets)]
    if unused:
        raise PeftCliError(
            f"method.feedforward_modules: {', '.join(unused)} matches none of the targeted modules; "
            f"feedforward_modules must be a subset of target_modules (targeted: {', '.join(short_names(targets))})"
        )
    if isinstance(params.target_modules, list) and isinstance(feedforward, list):
        return  # checked when the recipe loaded
    exclude = params.exclude_modules
    outside = [
        name
        for name in candidates
        if is_feedforward(name, feedforward)
        and name not in targets
        and not (exclude is not None and name_matches(name, exclude))
    ]
    if outside:
        raise PeftCliError(
            f"method.feedforward_modules: {outside[0]} is feed-forward but not in target_modules "
            f"({len(outside)} such); feedforward_modules must be a subset of target_modules: add them there "
            "or narrow feedforward_modules"
        )


def apply_method(model: nn.Module, params: IA3Params, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted linear/conv layer in an IA3Layer; feed-forward ones scale their input."""
    target, feedforward = _resolve_defaults(model, params)
    # 'all-linear' means linear layers only, as in HF PEFT; named targets may also be 2-D convolutions.
    layer_types = ("Linear",) if target == ALL_LINEAR else SPEC.capabilities.layer_types
    targets = find_targets(model, target, params.exclude_modules, layer_types, "ia3")
    _check_feedforward(params, feedforward, targets, _layer_names(model, layer_types))
    ff_names = [name for name in targets if is_feedforward(name, feedforward)]
    ff_set = set(ff_names)
    for name in targets:
        replace_module(model, name, IA3Layer(model.get_submodule(name), name in ff_set, params.init))
    return AppliedMethod(targets, config_extra={"feedforward_modules": sorted(ff_names)})


METHOD = MethodImplementation(apply_method=apply_method)
