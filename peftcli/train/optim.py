"""Optimizer and learning-rate schedule from the recipe's training section."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcli.recipe.schema import TrainingSection


def build_optimizer(model: nn.Module, training: TrainingSection) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on vectors (biases, norms, scales)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": training.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=training.betas)


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


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingSection, total_steps: int):
    """A LambdaLR following `lr_factor`."""
    warm = warmup_steps(training, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warm, training.schedule)
    )
