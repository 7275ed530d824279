"""Optimizer and learning-rate schedule from the recipe's training section."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcli.recipe.schema import TrainingSection


def build_optimizer(
    model: nn.Module, training: TrainingSection, method_groups: list[dict] | None = None
) -> torch.optim.Optimizer:
    """AdamW (training.optimizer picks torch's or a bitsandbytes one) over the trainable parameters; no weight
    decay on vectors (biases, norms, scales).

    `method_groups` (from a method's `optimizer_groups`, e.g. LoRA+) give some parameters their own learning
    rate, `lr_scale` times the recipe's; every other trainable parameter gets the recipe's rate. Each group
    keeps its `peak_lr` and the `name` of its method group for `LearningRateSchedule`.
    """
    scale_of: dict[int, float] = {}
    name_of: dict[float, str] = {1.0: ""}
    for group in method_groups or []:
        scale = float(group.get("lr_scale", 1.0))
        name_of.setdefault(scale, str(group.get("name", f"x{scale:g}")))
        for param in group["params"]:
            scale_of[id(param)] = scale
    buckets: dict[tuple[float, bool], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (scale_of.get(id(param), 1.0), param.dim() >= 2)
            buckets.setdefault(key, []).append(param)
    groups = [
        {
            "params": params,
            "lr": training.learning_rate * scale,
            "peak_lr": training.learning_rate * scale,
            "name": name_of[scale],
            "weight_decay": training.weight_decay if decays else 0.0,
        }
        for (scale, decays), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]
    return optimizer_class(training.optimizer)(groups, lr=training.learning_rate, betas=training.betas)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for training.optimizer; the 8-bit and paged ones come from bitsandbytes."""
    if name == "adamw":
        return torch.optim.AdamW
    from peftcli.models.quantize import require_bitsandbytes

    bnb = require_bitsandbytes(f"training.optimizer: {name}")
    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[name]


class LearningRateSchedule:
    """Warm-up, then constant, linear or cosine decay: the one place the optimizer's rates are set."""

    def __init__(self, training: TrainingSection, total_steps: int):
        self.total_steps = total_steps
        self.warmup = warmup_steps(training, total_steps)
        self.shape = training.schedule

    def factor(self, step: int) -> float:
        """Multiplier of the peak rates before optimizer step `step` (0-based)."""
        return lr_factor(step, self.total_steps, self.warmup, self.shape)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Set every group's rate for optimizer step `step`; returns what to log: `lr`, the recipe's rate, and
        `lr_<name>` for each method group with a rate of its own (LoRA+'s B matrices)."""
        factor = self.factor(step)
        rates: dict[str, float] = {}
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
            rates.setdefault(f"lr_{group['name']}" if group.get("name") else "lr", group["lr"])
        return rates


def warmup_steps(training: TrainingSection, total_steps: int) -> int:
    """Warm-up length in optimizer steps."""
    if training.warmup_steps is not None:
        return min(training.warmup_steps, total_steps)
    return int(math.ceil(training.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
