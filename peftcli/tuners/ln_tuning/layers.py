"""LayerNorm tuning: the forward pass runs a trainable fp32 copy (`ln_tuning_layers`) of each targeted norm.

The copy is named as HF PEFT names it, so parameter names equal HF's saved keys
(`...input_layernorm.ln_tuning_layers.weight`). Merging writes the tuned values over the base norm.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import task_head_names
from peftcli.tuners.inject import replace_module
from peftcli.tuners.ln_tuning.spec import LNTuningParams
from peftcli.tuners.protocol import AdapterContext, AdapterLayer, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import name_matches, select_targets, short_names, unmatched_entries

NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer, recognised by class name (nn.LayerNorm, LlamaRMSNorm, T5LayerNorm, ...)."""
    return type(module).__name__.endswith(NORM_CLASS_SUFFIXES)


class LNTuningLayer(AdapterLayer):
    """A frozen module and a trainable fp32 copy of it; the copy computes the output until merged."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        # Copied where the base lives; fp32 so training updates are not lost to half-precision rounding.
        self.ln_tuning_layers = copy.deepcopy(base_layer).to(torch.float32)
        self.merged = False
        self._original: list[torch.Tensor] | None = None

    def _tensor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(base, tuned) pairs of every parameter and floating buffer, matched by name."""
        tuned = dict(self.ln_tuning_layers.named_parameters()) | dict(self.ln_tuning_layers.named_buffers())
        pairs = []
        for name, tensor in list(self.base_layer.named_parameters()) + list(self.base_layer.named_buffers()):
            if tensor.is_floating_point() and name in tuned:
                pairs.append((tensor, tuned[name]))
        return pairs

    def merge(self) -> None:
        """Write the tuned values over the base module (keeping the originals for unmerge); idempotent."""
        if self.merged:
            return
        with torch.no_grad():
            pairs = self._tensor_pairs()
            self._original = [base.detach().clone() for base, _ in pairs]
            for base, tuned in pairs:
                base.copy_(tuned)
        self.merged = True

    def forget_unmerge_state(self) -> None:
        self._original = None

    def unmerge(self) -> None:
        """Put the original base values back."""
        if not self.merged:
            return
        with torch.no_grad():
            for (base, _), original in zip(self._tensor_pairs(), self._original or [], strict=True):
                base.copy_(original)
        self._original = None
        self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if torch.is_floating_point(x) and x.dtype != torch.float32:
            return self.ln_tuning_layers(x.to(torch.float32), *args, **kwargs).to(x.dtype)
        return self.ln_tuning_layers(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def find_norm_targets(model: nn.Module, params: LNTuningParams) -> list[str]:
    """Module names to tune: every norm by default, or the modules with parameters that target_modules names."""
    heads = task_head_names(model)  # trained in full anyway
    modules = {name: m for name, m in model.named_modules() if name and not _inside(name, heads)}
    norms = [name for name, m in modules.items() if is_norm(m)]
    shown = ", ".join(short_names(norms)) or "none"
    target, exclude = params.target_modules, params.exclude_modules
    if target is None:
        if not norms:
            raise PeftCliError(
                f"method.target_modules: this model ({type(model).__name__}) has no LayerNorm/RMSNorm layer; "
                "name the modules to tune in target_modules"
            )
        chosen = [name for name in norms if exclude is None or not name_matches(name, exclude)]
    else:
        # Containers (a block, an MLP) are never copied whole: only modules holding parameters of their own.
        candidates = [name for name, m in modules.items() if _own_parameters(m)]
        missing = unmatched_entries(candidates, target)
        containers = [entry for entry in missing if not unmatched_entries(modules, [entry])]
        if containers:
            raise PeftCliError(
                f"method.target_modules: {', '.join(containers)} has no parameters of its own; "
                f"name the layers inside it; normalisation layers: {shown}"
            )
        if missing:
            raise PeftCliError(
                f"method.target_modules: {', '.join(missing)} matched nothing; normalisation layers: {shown}"
            )
        chosen = select_targets(candidates, target, exclude)
    if not chosen:
        raise PeftCliError(
            f"method.target_modules: nothing left to tune after exclude_modules; normalisation layers: {shown}"
        )
    for name in chosen:
        outer = [other for other in chosen if name.startswith(other + ".")]
        if outer:
            raise PeftCliError(
                f"method.target_modules: {name} lies inside {outer[0]}, which is also targeted; target one of them"
            )
    return chosen


def apply_method(model: nn.Module, params: LNTuningParams, context: AdapterContext) -> AppliedMethod:
    """Give every targeted module a trainable copy that computes its output."""
    targets = find_norm_targets(model, params)
    for name in targets:
        replace_module(model, name, LNTuningLayer(model.get_submodule(name)))
    return AppliedMethod(targets)


METHOD = MethodImplementation(apply_method=apply_method)
