"""The preference losses against TRL's own code (the oracle) on identical inputs: loss values and gradients.

TRL computes these inside its trainers; each is called here unbound, with a stand-in `self` that carries only
the attributes it reads, so no trainer, model or dataset is built. Inputs are per-token log-probabilities of
completions of different lengths; fp32 throughout, losses of order 1, so the bound is fp32 rounding (1e-6).
"""

from __future__ import annotations

import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from peftcli.objectives.dpo import DpoOptions
from peftcli.objectives.orpo import OrpoOptions
from peftcli.objectives.pair_losses import PairLogps, pair_loss
from peftcli.objectives.simpo import SimpoOptions

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # trl.experimental announces itself

PAIRS, WIDTH, PROMPT = 4, 9, 2
CHOSEN_LENGTHS, REJECTED_LENGTHS = [3, 6, 1, 5], [4, 2, 6, 6]
TOLERANCE = 1e-6


class _OneProcess:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def _token_logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (2*PAIRS, WIDTH - 1), chosen rows first; column t scores token t + 1. And the
    mask of the completion tokens they score (the prompt is PROMPT tokens, padding after the completion)."""
    generator = torch.Generator().manual_seed(seed)
    values = -torch.rand(2 * PAIRS, WIDTH - 1, generator=generator, dtype=torch.float64).float() * 2
    mask = torch.zeros(2 * PAIRS, WIDTH, dtype=torch.long)
    for row, length in enumerate(CHOSEN_LENGTHS + REJECTED_LENGTHS):
        mask[row, PROMPT : PROMPT + length] = 1
    return values.requires_grad_(), mask


def _ours(options, values: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor | None = None):
    scored = mask[:, 1:].bool()
    sums, counts = (values * scored).sum(dim=1), scored.sum(dim=1)
    logps = PairLogps(*sums.chunk(2), *counts.chunk(2))
    if reference is not None:
        logps.ref_chosen, logps.ref_rejected = reference.chunk(2)
    losses, _, _ = pair_loss(options, logps)
    return losses.mean()  # TRL's loss is the mean over the batch's pairs


def _trl_dpo(options: DpoOptions, values: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor):
    from trl.trainer.dpo_trainer import DPOTrainer

    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), aux_loss_enabled=False,
        precompute_ref_logps=True, ref_model=None, ld_alpha=None, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, loss_types=[options.loss], loss_weights=[1.0], beta=options.beta,
        label_smoothing=options.label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip

    def model(*, labels, fused_lm_head, **_):  # what TRL's fused head returns: 0 where the label is masked
        scored = labels[:, 1:] != -100
        zeros = torch.zeros_like(values).detach()
        return SimpleNamespace(log_probs=values * scored, entropy=zeros, mean_logits=zeros, is_top1=scored & False)

    ids = torch.ones_like(mask)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = reference.chunk(2)
    return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def _reference(seed: int) -> torch.Tensor:
    return -torch.rand(2 * PAIRS, generator=torch.Generator().manual_seed(seed)) * 6


def _assert_same(ours_loss, trl_loss, ours_values, trl_values) -> None:
    assert abs(ours_loss.item() - trl_loss.item()) <= TOLERANCE * max(1.0, abs(trl_loss.item()))
    ours_loss.backward()
    trl_loss.backward()
    assert ours_values.grad.abs().sum() > 0  # the loss depends on every pair's log-probabilities
    assert torch.allclose(ours_values.grad, trl_values.grad, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        DpoOptions(loss="sigmoid", beta=0.1),
        DpoOptions(loss="sigmoid", beta=2.0),
        DpoOptions(loss="hinge", beta=0.5),
        DpoOptions(loss="ipo", beta=0.1),
        DpoOptions(loss="robust", beta=0.3, label_smoothing=0.2),
    ],
    ids=["sigmoid", "sigmoid-beta2", "hinge", "ipo", "robust"],
)
def test_dpo_matches_trl(options):
    values, mask = _token_logps(0)
    trl_values = values.detach().clone().requires_grad_()
    reference = _reference(1)
    trl_loss = _trl_dpo(options, trl_values, mask, reference)
    _assert_same(_ours(options, values, mask, reference), trl_loss, values, trl_values)


def _averages(values: torch.Tensor, mask: torch.Tensor):
    scored = mask[:, 1:].bool()
    return ((values * scored).sum(dim=1) / scored.sum(dim=1)).chunk(2)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_given_the_same_chosen_cross_entropy(beta):
    """TRL's ORPO takes its cross-entropy term over the chosen sequences' tokens pooled over the batch (prompt
    included); ours is each pair's mean over its chosen completion, as the paper's SFT term. The odds-ratio
    term, where the two could differ in substance, is TRL's: TRL is given our cross-entropy term."""
    from trl.experimental.orpo import ORPOTrainer

    options = OrpoOptions(beta=beta)
    values, mask = _token_logps(2)
    trl_values = values.detach().clone().requires_grad_()
    chosen, rejected = _averages(trl_values, mask)
    stand_in = SimpleNamespace(beta=beta, accelerator=_OneProcess(), aux_loss_enabled=False)
    stand_in.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, stand_in)
    nll = -chosen.mean()
    logits = torch.zeros(1)  # only averaged into a metric
    stand_in.concatenated_forward = lambda *_: (chosen, rejected, logits, logits, nll)
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(stand_in, None, {}, train_eval="train")
    _assert_same(_ours(options, values, mask), trl_loss, values, trl_values)


@pytest.mark.parametrize("beta, ratio", [(2.0, 0.5), (10.0, 0.3)])
def test_simpo_matches_trl(beta, ratio):
    from trl.experimental.cpo import CPOTrainer

    options = SimpoOptions(beta=beta, gamma_beta_ratio=ratio)
    values, mask = _token_logps(3)
    trl_values = values.detach().clone().requires_grad_()
    chosen, rejected = _averages(trl_values, mask)
    stand_in = SimpleNamespace(
        loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, cpo_alpha=0.0, label_smoothing=0.0, alpha=0.0,
        accelerator=_OneProcess(), aux_loss_enabled=False,
    )  # fmt: skip
    stand_in.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stand_in)
    logits = torch.zeros(1)  # only averaged into a metric
    stand_in.concatenated_forward = lambda *_: (chosen, rejected, logits, logits, torch.zeros(()))
    trl_loss, _ = CPOTrainer.get_batch_loss_metrics(stand_in, None, {}, train_eval="train")
    _assert_same(_ours(options, values, mask), trl_loss, values, trl_values)


def test_simpo_sft_weight_adds_the_chosen_cross_entropy():
    """TRL's CPO-SimPO pools its cross-entropy over the batch's chosen tokens; ours is per pair. The paper's
    formula, written here: SimPO's loss plus sft_weight times each pair's mean chosen-token cross-entropy."""
    values, mask = _token_logps(4)
    chosen, rejected = _averages(values.detach(), mask)
    beta, ratio, weight = 2.0, 0.5, 0.7
    expected = (-torch.nn.functional.logsigmoid(beta * (chosen - rejected) - ratio * beta) - weight * chosen).mean()
    got = _ours(SimpoOptions(beta=beta, gamma_beta_ratio=ratio, sft_weight=weight), values.detach(), mask)
    assert abs(got.item() - expected.item()) <= TOLERANCE
