"""The objective: the loss the loop minimises, as a sum over a batch's labels.

The loop weighs every label of an accumulation window the same across processes, so an objective gives two
things: how many labels a batch has, and the sum of their losses. The task objective covers causal LM,
seq2seq and classification; a preference objective (DPO and its kin) computes its own sum from the same
batch and plugs in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from peftcli.train.losses import batch_loss_sums, forward_logits, label_count


class Objective(Protocol):
    def label_count(self, batch: dict) -> int:
        """How many labels the batch's loss covers (tokens, examples, pairs)."""
        ...

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        """The sum of the batch's per-label losses, a scalar the loop differentiates."""
        ...


@dataclass
class TaskObjective:
    """Cross-entropy on the task's labels: next tokens, target tokens or classes."""

    task: str
    config: Any  # the model config (seq2seq decoder start and pad ids)

    def label_count(self, batch: dict) -> int:
        return label_count(batch, self.task)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        logits = forward_logits(model, batch, self.task, self.config)
        sums, _ = batch_loss_sums(logits, batch, self.task)
        return sums.sum()
