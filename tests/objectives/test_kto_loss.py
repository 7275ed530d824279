"""The kto loss against TRL's own code (the oracle) on identical inputs: loss values and gradients; and the kl
estimate's rule (the mean log-ratio of the mismatched rows, clamped at 0, without gradient).

TRL computes the kto loss inside `KTOTrainer._compute_loss`; it is called unbound with a stand-in `self` that
carries only what it reads, and a stand-in model that returns given per-token log-probabilities, so no trainer,
model or dataset is built. float64 throughout, losses and log-ratios of order 1 to 10 through a few dozen
operations: the two agree to float64 rounding, far below the 1e-12 bound.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from peftcli.objectives.kto import KtoOptions
from peftcli.objectives.kto_loss import UnpairedLogps, kl_estimate, kto_loss

pytest.importorskip("trl")

WIDTH, PROMPT = 9, 2
LENGTHS = [3, 6, 1, 5, 4, 2]
TOLERANCE = 1e-12


class _OneProcess:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor


def _token_logps(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (rows, WIDTH - 1); column t scores token t + 1. And the mask of the completion
    tokens (the prompt is PROMPT tokens, padding after the completion)."""
    generator = torch.Generator().manual_seed(seed)
    values = -torch.rand(rows, WIDTH - 1, generator=generator, dtype=torch.float64) * 2
    mask = torch.zeros(rows, WIDTH, dtype=torch.long)
    for row, length in enumerate(LENGTHS[:rows]):
        mask[row, PROMPT : PROMPT + length] = 1
    return values, mask


def _sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask[:, 1:]).sum(dim=1)


def _trl_kto(options: KtoOptions, values, mask, kl_values, kl_mask, desirable, reference, kl_reference):
    from trl.trainer.kto_trainer import KTOTrainer

    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=options.beta,
        desirable_weight=options.desirable_weight, undesirable_weight=options.undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    stand_in._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stand_in, model, batch)

    def model(*, input_ids, labels, fused_lm_head, **_):  # the fused head's output: 0 where the label is masked
        scored = labels[:, 1:] != -100
        given = kl_values if bool((input_ids == 2).all()) else values  # the KL rows are told apart by their ids
        zeros = torch.zeros_like(given).detach()
        return SimpleNamespace(log_probs=given * scored, entropy=zeros, mean_logits=zeros)

    inputs = {
        "input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "KL_input_ids": torch.full_like(kl_mask, 2), "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask, "label": desirable, "ref_logps": reference, "ref_KL_logps": kl_reference,
    }  # fmt: skip
    return KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def _ours(options: KtoOptions, values, mask, kl_values, kl_mask, desirable, reference, kl_reference):
    kl = kl_estimate(_sums(kl_values, kl_mask), kl_reference)
    losses, _ = kto_loss(options, UnpairedLogps(_sums(values, mask), reference, desirable), kl)
    return losses.mean()  # TRL's loss is the mean over the batch's examples; the loop divides by their count


@pytest.mark.parametrize(
    "options",
    [
        KtoOptions(),
        KtoOptions(beta=0.5, desirable_weight=1.33, undesirable_weight=0.7),
        KtoOptions(beta=2.0, desirable_weight=0.5, undesirable_weight=3.0),
    ],
    ids=["defaults", "weighted", "beta2"],
)
@pytest.mark.parametrize(
    "labels",
    [[True, False, True, True, False, False], [True] * 6, [False] * 6],
    ids=["mixed", "only-desirable", "only-undesirable"],
)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0], ids=["kl-positive", "kl-clamped"])
def test_kto_matches_trl(options, labels, kl_sign):
    rows = len(labels)
    values, mask = _token_logps(0, rows)
    kl_values, kl_mask = _token_logps(1, rows)
    kl_mask = kl_mask.roll(1, dims=0)  # the mismatched rows: other completions' lengths
    generator = torch.Generator().manual_seed(2)
    reference = _sums(values, mask) + torch.randn(rows, generator=generator, dtype=torch.float64) * 3
    # kl_sign -1: the policy scores the mismatched rows below the reference, so the estimate is clamped to 0
    gaps = 0.5 + torch.rand(rows, generator=generator, dtype=torch.float64)
    kl_reference = _sums(kl_values, kl_mask) - kl_sign * gaps
    desirable = torch.tensor(labels)
    ours_values, trl_values = values.clone().requires_grad_(), values.clone().requires_grad_()
    ours_kl_values, trl_kl_values = kl_values.clone().requires_grad_(), kl_values.clone().requires_grad_()
    args = (kl_mask, desirable, reference, kl_reference)
    ours = _ours(options, ours_values, mask, ours_kl_values, *args)
    trl = _trl_kto(options, trl_values, mask, trl_kl_values, *args)
    assert abs(ours.item() - trl.item()) <= TOLERANCE * max(1.0, abs(trl.item())), (ours.item(), trl.item())
    ours.backward()
    trl.backward()
    assert ours_values.grad.abs().sum() > 0  # every example's completion log-probabilities move the loss
    assert torch.allclose(ours_values.grad, trl_values.grad, atol=TOLERANCE, rtol=0)
    assert ours_kl_values.grad is None or not ours_kl_values.grad.any()  # the kl estimate takes no gradient


def test_kl_estimate_is_the_clamped_mean_log_ratio_without_gradient():
    policy = torch.tensor([-3.0, -5.0, -2.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-4.0, -5.5, -2.0], dtype=torch.float64)
    kl = kl_estimate(policy, reference)
    assert kl.item() == pytest.approx(0.5, abs=1e-15) and not kl.requires_grad  # (1 + 0.5 + 0) / 3
    assert kl_estimate(reference, policy.detach()).item() == 0.0  # a negative mean is clamped at 0
    assert kl_estimate(policy[:0], reference[:0]).item() == 0.0  # no rows: no estimate, 0


def test_rewards_and_a_kl_given_with_gradient_stay_detached():
    options = KtoOptions(beta=0.3)
    policy = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
    kl = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    logps = UnpairedLogps(policy, torch.tensor([-2.5, -0.5], dtype=torch.float64), torch.tensor([True, False]))
    losses, rewards = kto_loss(options, logps, kl)
    assert torch.allclose(rewards, torch.tensor([0.15, -0.15], dtype=torch.float64)) and not rewards.requires_grad
    losses.sum().backward()
    assert kl.grad is None and policy.grad[0] < 0 < policy.grad[1]  # raise the desirable, lower the undesirable
    # before any step (policy = reference, kl 0) every example's loss is its weight times 1 - sigmoid(0)
    start = UnpairedLogps(policy.detach(), policy.detach(), torch.tensor([True, False]))
    weighted = KtoOptions(desirable_weight=2.0, undesirable_weight=0.5)
    assert kto_loss(weighted, start, torch.tensor(0.0))[0].tolist() == [1.0, 0.25]
