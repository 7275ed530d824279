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

from peftcli.train.head_loss import OutputHead, chunked_loss_sums
from peftcli.train.losses import batch_loss_sums, forward_logits, label_count, model_inputs


class Objective(Protocol):
    def label_count(self, batch: dict) -> int:
        """How many labels the batch's loss covers (tokens, examples, pairs)."""
        ...

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        """The sum of the batch's per-label losses, a scalar the loop differentiates."""
        ...


@dataclass
class TaskObjective:
    """Cross-entropy on the task's labels: next tokens, target tokens or classes.

    With `head` (causal LM), the loss is taken from the last hidden state in chunks, never holding the full
    logits (train/head_loss.py); without it, from the model's logits.
    """

    task: str
    config: Any  # the model config (seq2seq decoder start and pad ids)
    head: OutputHead | None = None

    def label_count(self, batch: dict) -> int:
        return label_count(batch, self.task)

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss sums and label counts."""
        if self.head is not None:
            inputs = model_inputs(batch, self.task, self.config)
            return chunked_loss_sums(self.head, model, inputs, batch["labels"])
        return batch_loss_sums(forward_logits(model, batch, self.task, self.config), batch, self.task)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return self.loss_sums(model, batch)[0].sum()
