"""PiSSA and OLoRA: start A and B from the base weight's own structure, and undo that when saving.

Both set s·B0·A0 to the dominant part of W and train on the residual W_res = W - s·B0·A0, so the layer still
starts as the identity. After training the model is W_res + s·B·A = W + s·(B·A - B0·A0): a plain LoRA on the
original W, of rank 2r, with A' = [A; A0] and B' = [B, -B0]. That is what gets saved, with alpha adjusted so
the scaling stays s (HF PEFT's `path_initial_model_for_weight_conversion` does the same).
"""

from __future__ import annotations

import math

import torch

from peftcli.tuners.lora.spec import LoraParams


def decompose(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r), fp32, with s·B·A the top-r part of `weight` (out x in).

    pissa: a full SVD, split as B = U·sqrt(S/s), A = sqrt(S/s)·Vh; pissa_niter_N: the same from
    torch.svd_lowrank with N power iterations (random, so it follows the torch seed); olora: the first r
    columns of Q and rows of R of a QR decomposition. Everything is computed in fp32 whatever the base dtype.
    """
    matrix = weight.detach().float()
    if init == "olora":
        q, upper = torch.linalg.qr(matrix)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    elif init.startswith("pissa_niter_"):
        u, s, v = torch.svd_lowrank(matrix, q=r, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.t()
    else:
        raise ValueError(f"init {init!r} does not decompose the base weight")
    root = torch.sqrt(s / scaling)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def plain_lora_factors(
    a: torch.Tensor, b: torch.Tensor, initial_a: torch.Tensor, initial_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[A; A0] and [B, -B0]: B'·A' = B·A - B0·A0, the trained change relative to the original base."""
    return torch.cat([a, initial_a.to(a)], dim=0), torch.cat([b, -initial_b.to(b)], dim=1)


def plain_lora_config(params: LoraParams) -> dict:
    """adapter_config.json fields of the converted adapter: every rank doubled, every scaling unchanged.

    With alpha/r scaling alpha doubles too; with rsLoRA's alpha/sqrt(r) it grows by sqrt(2). Every layer's
    alpha (global or from alpha_pattern) gets the same factor as every rank, so the conversion is exact with
    patterns and rsLoRA together (HF PEFT refuses that combination; it doubles pattern alphas either way).
    """
    factor = math.sqrt(2) if params.rslora else 2

    def alpha(value: float) -> int | float:
        scaled = value * factor
        return int(scaled) if float(scaled).is_integer() else scaled

    return {
        "r": params.r * 2,
        "lora_alpha": alpha(params.alpha),
        "rank_pattern": {key: value * 2 for key, value in params.rank_pattern.items()},
        "alpha_pattern": {key: alpha(value) for key, value in params.alpha_pattern.items()},
        "init_lora_weights": True,
    }
