"""The preference losses, per pair, from summed completion log-probabilities (the torch side of dpo, orpo and
simpo; the options are in their own modules).

Inputs, one entry per pair: the policy's summed log-probabilities of the chosen and rejected completions, their
token counts, and for dpo the reference policy's sums. Outputs: the per-pair loss and the implicit rewards the
metrics report (dpo: beta times the log-ratio to the reference; orpo and simpo: beta times the average
log-probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    chosen: torch.Tensor  # (pairs,) summed log-probabilities of the chosen completions
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # (pairs,) completion tokens counted in those sums
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # the reference policy's sums (dpo)
    ref_rejected: torch.Tensor | None = None

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def pair_loss(options, logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) of the objective `options` names."""
    return {"dpo": dpo_loss, "orpo": orpo_loss, "simpo": simpo_loss}[options.name](options, logps)


def dpo_loss(options, logps: PairLogps):
    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    beta, margin = options.beta, chosen_ratio - rejected_ratio
    if options.loss == "sigmoid":
        loss = -F.logsigmoid(beta * margin)
    elif options.loss == "hinge":
        loss = torch.relu(1 - beta * margin)
    elif options.loss == "ipo":  # on per-token log-ratios, so beta means the same whatever the lengths
        per_token = chosen_ratio / logps.chosen_tokens.clamp(min=1) - rejected_ratio / logps.rejected_tokens.clamp(
            min=1
        )
        loss = (per_token - 1 / (2 * beta)) ** 2
    else:  # robust: unbiased under a share `label_smoothing` of flipped labels
        eps = options.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(options, logps: PairLogps):
    chosen_avg, rejected_avg = logps.averages()
    # log odds(p) = log p - log(1 - p), on the per-token average probability of each completion
    log_odds = (chosen_avg - rejected_avg) - (
        torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg))
    )
    loss = -chosen_avg - options.beta * F.logsigmoid(log_odds)
    return loss, options.beta * chosen_avg.detach(), options.beta * rejected_avg.detach()


def simpo_loss(options, logps: PairLogps):
    chosen_avg, rejected_avg = logps.averages()
    loss = -F.logsigmoid(options.beta * (chosen_avg - rejected_avg - options.gamma_beta_ratio))
    if options.sft_weight:
        loss = loss - options.sft_weight * chosen_avg
    return loss, options.beta * chosen_avg.detach(), options.beta * rejected_avg.detach()
