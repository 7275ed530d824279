"""Preference objectives in the loop (dpo, orpo, simpo): a batch holds each pair's chosen rows, then its
rejected rows (data/collate.py: PairCollator); the loss is summed per pair, and the implicit rewards are
summed for the metrics.

The reference policy is the starting policy: the trainable tensors as they were before the first step (a new
adapter's identity, or the adapter training started from), swapped in for a no-grad forward. It costs one
copy of the trainable tensors and no second model, and works for every method. Under engines that shard
parameters (ZeRO-3, FSDP2) the swap is not possible; those are refused at validation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from peftcli.objectives.pair_losses import PairLogps, pair_loss
from peftcli.train.objective import TaskObjective

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")


@dataclass
class StartingPolicy:
    """The trainable tensors' values before training, to swap in for a reference forward."""

    params: list[torch.nn.Parameter]
    values: list[torch.Tensor]

    @classmethod
    def snapshot(cls, model: torch.nn.Module) -> StartingPolicy:
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, [p.detach().clone() for p in params])

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model computes the starting policy inside (no grad, eval mode: no dropout)."""
        current = [p.data for p in self.params]
        was_training = model.training
        for param, value in zip(self.params, self.values, strict=True):
            param.data = value
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for param, value in zip(self.params, current, strict=True):
                param.data = value
            model.train(was_training)


@dataclass
class PreferenceObjective:
    """The pair loss of `options` (an objective's recipe options) over the completion log-probabilities."""

    options: object
    tokens: TaskObjective  # per-row completion cross-entropy sums (chunked from the hidden state when set)
    reference: StartingPolicy | None = None
    sums: torch.Tensor | None = None  # metric sums since the last take_metrics

    @property
    def head(self):
        return self.tokens.head

    @head.setter
    def head(self, value) -> None:
        self.tokens.head = value

    @property
    def task(self) -> str:
        return self.tokens.task

    def label_count(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # pairs

    def pair_logps(self, model, batch: dict) -> PairLogps:
        sums, counts = self.tokens.loss_sums(model, batch)
        chosen, rejected = (-sums).chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
        if self.reference is not None:
            with self.reference.swapped_in(model):
                ref_sums, _ = self.tokens.loss_sums(model, batch)
            logps.ref_chosen, logps.ref_rejected = (-ref_sums.detach()).chunk(2)
        return logps

    def pair_terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses, and per-pair metric values (pairs, len(METRICS)), detached."""
        logps = self.pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = pair_loss(self.options, logps)
        margin = chosen_rewards - rejected_rewards
        # A tie counts half: before a dpo run's first step every margin is exactly 0, which is chance, not 0%.
        ranked = (margin > 0).double() + 0.5 * (margin == 0).double()
        values = (chosen_rewards, rejected_rewards, margin, ranked, logps.chosen, logps.rejected)
        return losses, torch.stack([v.detach().double() for v in values], dim=1)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        losses, values = self.pair_terms(model, batch)
        self.sums = values.sum(dim=0) if self.sums is None else self.sums + values.sum(dim=0)
        return losses.sum()

    def take_metrics(self, device) -> torch.Tensor:
        """The metric sums (METRICS order) since the last call, and start again."""
        sums = self.sums if self.sums is not None else torch.zeros(len(METRICS), dtype=torch.float64)
        self.sums = None
        return sums.to(device)
