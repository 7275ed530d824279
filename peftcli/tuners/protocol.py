"""The contract of a method's torch side (`tuners/<method>/layers.py`), and of the layers it adds.

A method's layers module ends with one `METHOD = MethodImplementation(...)` naming its hooks; hooks it does
not name keep the defaults here, so the shared machinery (`adapter.py`, `train/`, `export/merge.py`) calls
every hook plainly. Every hook gets the model and the method's params.

Layers that wrap a base module subclass `AdapterLayer`: the in-memory merge and the streaming merge of
`peft merge` rely on exactly what it declares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.tuners.hf_format import HF_KEY_PREFIX


@dataclass
class AdapterContext:
    """What a method may need besides the model and its params."""

    task: str = "causal_lm"  # one of registry.TASK_TYPES
    tokenizer: Any = None  # for methods that initialise from text (prompt tuning); may be None
    total_steps: int | None = None  # training length, for methods with schedules (AdaLoRA)


@dataclass
class AppliedMethod:
    """What `apply_method` did: the module names it adapted and extra adapter_config.json fields."""

    targeted: list[str]
    config_extra: dict = field(default_factory=dict)  # e.g. prompt methods record num_layers, token_dim
    targeted_parameters: list[str] = field(default_factory=list)  # parameters adapted directly (MoE experts)


class AdapterLayer(nn.Module):
    """A layer a method puts around a base module.

    - `base_layer`: the wrapped module, or another AdapterLayer of the same module (several adapted
      parameters of one module nest); the innermost base's own parameters are the checkpoint's tensors.
    - `merge()` / `unmerge()`: fold the update into those tensors and take it out again; each is idempotent,
      and `merged` says which state the layer is in. `merge()` works on whatever values the base tensors hold
      (the streaming merge puts the checkpoint's fp32 values there first).
    - `shares_weight_with`: other modules that use the same base weight (a tied embedding); merging is
      refused while it is not empty, since the partner would change too.
    - `forget_unmerge_state()`: drop copies kept only to undo a merge exactly (the streaming merge never
      unmerges, and moves on to the next layer's values).
    """

    merged: bool = False
    shares_weight_with: tuple[str, ...] = ()

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def forget_unmerge_state(self) -> None:
        """Nothing kept by default."""


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    """Every adapter layer of the model, outer ones before the ones they wrap."""
    return [module for module in model.modules() if isinstance(module, AdapterLayer)]


def merge_layers(model: nn.Module, params: Any) -> None:
    """Merge every adapter layer in place."""
    for layer in adapter_layers(model):
        layer.merge()


def unmerge_layers(model: nn.Module, params: Any) -> None:
    """Undo `merge_layers`."""
    for layer in adapter_layers(model):
        layer.unmerge()


def tensors_under_hf_keys(model: nn.Module, params: Any, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk keys are the parameter names behind HF PEFT's prefix."""
    return {HF_KEY_PREFIX + name: tensor for name, tensor in named.items()}


def tensors_under_names(model: nn.Module, params: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `tensors_under_hf_keys`."""
    return {key.removeprefix(HF_KEY_PREFIX): tensor for key, tensor in tensors.items()}


def _nothing(*args) -> None:
    return None


def _no_groups(model: nn.Module, params: Any) -> list[dict]:
    return []


def _no_tensors(model: nn.Module, params: Any) -> dict:
    return {}


@dataclass(frozen=True)
class MethodImplementation:
    """A method's torch side. Only `apply_method` is required."""

    # Add the method to `model` (already frozen). New parameters, and base parameters left with
    # requires_grad=True, become the adapter. Layers must start in a state where the adapted model equals the
    # base (identity) wherever the method defines one.
    apply_method: Callable[[nn.Module, Any, AdapterContext], AppliedMethod]
    # Used when Capabilities.mergeable: fold the update into the base weights and take it out again.
    merge_all: Callable[[nn.Module, Any], None] = merge_layers
    unmerge_all: Callable[[nn.Module, Any], None] = unmerge_layers
    # On-disk tensors from the adapter's parameters (by name), and back.
    adapter_tensors: Callable[[nn.Module, Any, dict], dict] = tensors_under_hf_keys
    load_tensors: Callable[[nn.Module, Any, dict], dict] = tensors_under_names
    # Parameter groups with their own `lr_scale` (LoRA+ trains B faster than A).
    optimizer_groups: Callable[[nn.Module, Any], list[dict]] = _no_groups
    # A term added to the training loss (AdaLoRA's orthogonality penalty), or None.
    extra_loss: Callable[[nn.Module, Any], torch.Tensor | None] = _nothing
    # Called after each optimizer step with its 0-based index, before gradients are cleared.
    after_optimizer_step: Callable[[nn.Module, Any, int], None] = _nothing
    # State besides parameters that a checkpoint keeps for an exact resume (AdaLoRA's importance), and back.
    training_state: Callable[[nn.Module, Any], dict[str, torch.Tensor]] = _no_tensors
    load_training_state: Callable[[nn.Module, Any, dict], None] = _nothing
    # adapter_config.json fields that change during training (AdaLoRA's final rank_pattern).
    config_updates: Callable[[nn.Module, Any], dict] = _no_tensors
