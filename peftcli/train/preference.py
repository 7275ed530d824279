"""Preference objectives in the loop (dpo, orpo, simpo): a batch holds each pair's chosen rows, then its
rejected rows (data/collate.py: PairCollator); the loss is summed per pair, and the implicit rewards are
summed for the metrics. kto's side, on unpaired examples, is in train/unpaired.py.

Every preference objective logs its own metrics (`metric_names`) the same way: `terms` gives each example's
loss and a row of metric values whose column sums, over any examples, any micro-batches and any processes, are
all that `metric_means` needs to turn them into the logged means. So a step adds its rows up on each process
and all-reduces the sums once, and evaluation gathers the rows of the whole validation set.

The reference policy is the starting policy: the trainable tensors as they were before the first step (a new
adapter's identity, or the adapter training started from, `model.adapter`). `objective.reference: live`
swaps them in for a no-grad forward: one copy of the trainable tensors and no second model, for every
method, but not under engines that shard parameters (ZeRO-3, FSDP2). `precomputed` reads the log-probabilities
from a table filled once before the first step (train/reference_logps.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from peftcli.objectives.pair_losses import PairLogps, pair_loss
from peftcli.train.objective import TaskObjective
from peftcli.train.reference_logps import ReferenceTable

ROWS = ("input_ids", "attention_mask", "labels")  # what a forward reads of a preference batch
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")


@runtime_checkable
class RewardObjective(Protocol):
    """A preference objective: its loss per example (a pair, or an unpaired example) and its reward metrics."""

    unit: str  # what an example is called in metrics and messages: "pairs", "examples"
    metric_names: tuple[str, ...]

    def terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses, and per-example metric rows (examples, columns) whose sums metric_means reads."""
        ...

    def take_metrics(self, device) -> torch.Tensor:
        """The metric rows' sums since the last call, and start again."""
        ...

    def metric_means(self, sums: torch.Tensor) -> dict[str, float | None]:
        """The logged metrics from metric row sums (over micro-batches and processes)."""
        ...


@dataclass
class StartingPolicy:
    """The trainable tensors' values before training, to swap in for a reference forward."""

    params: list[torch.nn.Parameter]
    values: list[torch.Tensor]

    @classmethod
    def snapshot(cls, model: torch.nn.Module) -> StartingPolicy:
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, [p.detach().clone() for p in params])

    def logps(self, model, batch: dict, tokens: TaskObjective) -> torch.Tensor:
        """The starting policy's summed completion log-probabilities of every row of the batch."""
        with self.swapped_in(model):
            sums, _ = tokens.loss_sums(model, {key: batch[key] for key in ROWS if key in batch})
        return -sums.detach()

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


class OverTokenSums:
    """For objectives built on per-row completion log-probabilities (`tokens`): the loop sets and reads the
    output head (chunked cross-entropy) and the task through them."""

    tokens: TaskObjective

    @property
    def head(self):
        return self.tokens.head

    @head.setter
    def head(self, value) -> None:
        self.tokens.head = value

    @property
    def task(self) -> str:
        return self.tokens.task


@dataclass
class PreferenceObjective(OverTokenSums):
    """The pair loss of `options` (an objective's recipe options) over the completion log-probabilities."""

    options: object
    tokens: TaskObjective  # per-row completion cross-entropy sums (chunked from the hidden state when set)
    reference: StartingPolicy | ReferenceTable | None = None
    sums: torch.Tensor | None = None  # metric sums since the last take_metrics
    unit = "pairs"
    metric_names = METRICS

    def label_count(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # pairs

    def pair_logps(self, model, batch: dict) -> PairLogps:
        sums, counts = self.tokens.loss_sums(model, batch)
        chosen, rejected = (-sums).chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
        if self.reference is not None:
            logps.ref_chosen, logps.ref_rejected = self.reference.logps(model, batch, self.tokens).chunk(2)
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

    def terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses, and per-pair rows: 1 (the pair count), then the METRICS values."""
        losses, values = self.pair_terms(model, batch)
        return losses, torch.cat([torch.ones_like(values[:, :1]), values], dim=1)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        losses, rows = self.terms(model, batch)
        self.sums = add_rows(self.sums, rows)
        return losses.sum()

    def take_metrics(self, device) -> torch.Tensor:
        sums, self.sums = taken(self.sums, 1 + len(METRICS)), None
        return sums.to(device)

    def metric_means(self, sums: torch.Tensor) -> dict[str, float | None]:
        """Every metric is a mean over the pairs."""
        pairs = max(1.0, float(sums[0]))
        return {name: float(total) / pairs for name, total in zip(METRICS, sums[1:], strict=True)}


def add_rows(sums: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Running column sums of metric rows."""
    return rows.sum(dim=0) if sums is None else sums + rows.sum(dim=0)


def taken(sums: torch.Tensor | None, columns: int) -> torch.Tensor:
    """The running sums, zeros when no batch added any (float64, for exact sums across processes)."""
    return sums if sums is not None else torch.zeros(columns, dtype=torch.float64)
