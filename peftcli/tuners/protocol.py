"""What a method's torch side provides: the contract every `tuners/<method>/layers.py` module follows.

A method is a module, not a class: `apply_method` is required, the rest are optional and looked up by
name, so a method only writes what it needs. The shared machinery (freezing, counting, saving, loading,
the training loop) lives in `adapter.py` and `train/` and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


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


class MethodImplementation(Protocol):
    """The functions a method module may define. Only `apply_method` is required."""

    def apply_method(self, model: nn.Module, params: Any, context: AdapterContext) -> AppliedMethod:
        """Add the method to `model` (already frozen). New parameters, and base parameters left with
        requires_grad=True, become the adapter. Layers must start in a state where the adapted model equals
        the base (identity) wherever the method defines one."""
        ...

    # Needed when Capabilities.mergeable: fold the update into the base weights and take it out again.
    # Both are idempotent (merging twice adds the update once).
    def merge_all(self, model: nn.Module) -> None: ...
    def unmerge_all(self, model: nn.Module) -> None: ...

    # On-disk tensors, when the method's keys are not `base_model.model.<parameter name>` (prompt methods).
    def adapter_tensors(self, model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def load_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the tensors under parameter names (the inverse of adapter_tensors)."""
        ...

    # Training hooks.
    def optimizer_groups(self, model: nn.Module, params: Any) -> list[dict]:
        """Parameter groups with their own `lr_scale` (LoRA+ trains B faster than A)."""
        ...

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (AdaLoRA's orthogonality penalty)."""
        ...

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step, before gradients are cleared (AdaLoRA's rank allocation)."""
        ...

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """State besides parameters that a checkpoint must keep for an exact resume (AdaLoRA's importance)."""
        ...

    def load_training_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state` returned."""
        ...

    def config_updates(self, model: nn.Module) -> dict:
        """adapter_config.json fields that change during training (AdaLoRA's final rank_pattern)."""
        ...
