"""kto in the loop: a batch holds each example's own row, then its mismatched row (the same prompt with another
example's completion, data/collate.py: UnpairedCollator), and `desirable`, the examples' labels.

Per micro-batch: the reference log-probabilities of every row (a no-grad forward with the starting policy
swapped in, or the precomputed table: train/reference_logps.py), one no-grad forward of the mismatched rows
with the policy, then the forward the loss differentiates, of the examples' own rows. The kl estimate is
added up over every process's mismatched rows before it is used, so each process computes the loss a single
process holding the whole micro-batch would.

Metrics (means over a step's, or the validation set's, examples): rewards/chosen over the desirable examples,
rewards/rejected over the undesirable ones, rewards/margin their difference, kl (the reference point, per
example of the micro-batch it was estimated on), logps/chosen and logps/rejected likewise. There is no reward
accuracy: an unpaired example has nothing to be ranked against. A mean over no example (a step with only
desirable examples has no rewards/rejected) is logged as null.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftcli.objectives.kto_loss import UnpairedLogps, kl_estimate, kto_loss
from peftcli.train.objective import TaskObjective
from peftcli.train.preference import ROWS, OverTokenSums, StartingPolicy, add_rows, taken
from peftcli.train.reference_logps import ReferenceTable

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "kl", "logps/chosen", "logps/rejected")
# The columns of a metric row: which label the example has, its reward and log-probability on the side of its
# label (0 on the other), and the kl estimate of its micro-batch.
COLUMNS = ("desirable", "undesirable", "reward_desirable", "reward_undesirable", "logp_desirable")
COLUMNS += ("logp_undesirable", "kl")


def half(batch: dict, second: bool) -> dict:
    """The examples' own rows (first half) or their mismatched rows (second half) of an unpaired batch."""
    count = int(batch["desirable"].shape[0])
    rows = slice(count, 2 * count) if second else slice(0, count)
    return {key: batch[key][rows] for key in ROWS if key in batch}


@dataclass
class UnpairedObjective(OverTokenSums):
    """The kto loss of `options` over the completion log-probabilities of unpaired examples."""

    options: object
    tokens: TaskObjective  # per-row completion cross-entropy sums (chunked from the hidden state when set)
    reference: StartingPolicy | ReferenceTable
    sums: torch.Tensor | None = None  # metric sums since the last take_metrics
    unit = "examples"
    metric_names = METRICS

    def label_count(self, batch: dict) -> int:
        return int(batch["desirable"].shape[0])  # examples

    def logps(self, model, batch: dict) -> tuple[UnpairedLogps, torch.Tensor]:
        """The examples' log-probabilities under policy and reference, and the kl estimate of the micro-batch."""
        own, mismatched = half(batch, False), half(batch, True)
        ref_own, ref_mismatched = self.reference.logps(model, batch, self.tokens).chunk(2)
        with torch.no_grad():
            policy_mismatched = -self.tokens.loss_sums(model, mismatched)[0]
        kl = kl_estimate(policy_mismatched, ref_mismatched)
        policy = -self.tokens.loss_sums(model, own)[0]
        return UnpairedLogps(policy, ref_own, batch["desirable"].to(policy.device)), kl

    def terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses, and per-example metric rows (COLUMNS), detached."""
        logps, kl = self.logps(model, batch)
        losses, rewards = kto_loss(self.options, logps, kl)
        good = logps.desirable.double()
        bad = 1 - good
        logp = logps.policy.detach().double()
        rewards = rewards.double()
        values = (good, bad, rewards * good, rewards * bad, logp * good, logp * bad, kl.double().expand_as(good))
        return losses, torch.stack(values, dim=1)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        losses, rows = self.terms(model, batch)
        self.sums = add_rows(self.sums, rows)
        return losses.sum()

    def take_metrics(self, device) -> torch.Tensor:
        sums, self.sums = taken(self.sums, len(COLUMNS)), None
        return sums.to(device)

    def metric_means(self, sums: torch.Tensor) -> dict[str, float | None]:
        """Rewards and log-probabilities over the examples of their label; None where there are none."""
        good, bad, reward_good, reward_bad, logp_good, logp_bad, kl = (float(x) for x in sums)

        def mean(total: float, count: float) -> float | None:
            return total / count if count else None

        chosen, rejected = mean(reward_good, good), mean(reward_bad, bad)
        margin = None if chosen is None or rejected is None else chosen - rejected
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": margin,
            "kl": mean(kl, good + bad),
            "logps/chosen": mean(logp_good, good),
            "logps/rejected": mean(logp_bad, bad),
        }
