"""The kto loss, per example, from summed completion log-probabilities (the torch side of objectives/kto.py).

Each example's log-ratio is its completion's summed log-probability under the policy minus that under the
reference policy. The loss compares the log-ratio with a reference point z, an estimate of the KL divergence
between policy and reference: desirable examples are pushed above it, undesirable ones below it, through a
sigmoid of slope beta. z is estimated from mismatched rows (an example's prompt with another example's
completion, chosen when the data is prepared: data/formats.py), without gradient and clamped at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UnpairedLogps:
    policy: torch.Tensor  # (examples,) the policy's summed completion log-probabilities
    reference: torch.Tensor  # (examples,) the reference policy's
    desirable: torch.Tensor  # (examples,) bool: the example's label


def kl_estimate(policy: torch.Tensor, reference: torch.Tensor, across_processes: bool = True) -> torch.Tensor:
    """The reference point z: the mean of policy minus reference log-probability over mismatched rows, without
    gradient, clamped at 0. With torch.distributed initialised the sum and the count are added over every
    process first, so each process holds the same z, the one a single process holding every row computes."""
    gaps = (policy.detach() - reference.detach()).double()
    totals = torch.stack([gaps.sum(), torch.tensor(float(gaps.numel()), dtype=torch.float64, device=gaps.device)])
    if across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).to(policy.dtype)


def kto_loss(options, logps: UnpairedLogps, kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example loss, per-example reward beta * log-ratio, detached) of the kto objective `options`."""
    ratio = logps.policy - logps.reference
    beta, kl = options.beta, kl.detach()
    above = 1 - torch.sigmoid(beta * (ratio - kl))  # desirable: low once the log-ratio is well above z
    below = 1 - torch.sigmoid(beta * (kl - ratio))  # undesirable: low once it is well below z
    loss = torch.where(logps.desirable, options.desirable_weight * above, options.undesirable_weight * below)
    return loss, beta * ratio.detach()
