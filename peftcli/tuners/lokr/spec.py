"""LoKr (LyCORIS, Yeh et al. 2023): ΔW = kron(w1, w2) · alpha/r, with w1 and w2 optionally low-rank products.

The weight's output and input sizes are each split into two factors (out = a·b, in = c·d, HF PEFT's
factorisation, so the shapes match theirs); w1 is a x c and w2 is b x d (times the kernel for convolutions).
Same tensors and adapter_config.json as HF PEFT's LOKR.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import (
    TargetSpec,
    check_target_spec,
    exclude_modules_field,
    hf_fields,
    modules_to_save_field,
    target_modules_field,
)
from peftcli.tuners.loha.spec import PATTERN_HELP, check_hf_config, check_patterns
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner


class LokrParams(StrictModel):
    """Recipe options of the `lokr` method."""

    name: Literal["lokr"] = "lokr"
    r: int = Field(
        8,
        gt=0,
        description="Rank of the low-rank products used for a Kronecker factor when r is below half its larger "
        "side (always for w2; for w1 only with decompose_both); larger factors are trained in full.",
    )
    alpha: float = Field(8, gt=0, description="Scale numerator: ΔW is multiplied by alpha / r.")
    rank_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Training only: probability of zeroing each output row of ΔW."
    )
    rank_dropout_scale: bool = Field(False, description="Divide the rows kept by rank dropout by the share kept.")
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Training only: probability of skipping a layer's whole update in a forward."
    )
    use_effective_conv2d: bool = Field(
        False,
        description="Conv1d/Conv2d layers with a kernel larger than 1 and a low-rank w2: factor w2's kernel "
        "through an r x r core (FedPara's Proposition 3) instead of flattening it.",
    )
    decompose_both: bool = Field(False, description="Also write w1 as a low-rank product when r allows it.")
    decompose_factor: int = Field(
        -1,
        description="Split each dimension as (f, dim/f) when f divides it; -1 picks the two divisors closest "
        "to its square root.",
    )
    init: Literal["default", "lycoris"] = Field(
        "default",
        description="default: w1 (or w1_a) zero, w2 random, as HF PEFT; lycoris: w1 random, w2 (or w2_b) zero, "
        "as the LyCORIS repository. Both start as the identity.",
    )
    target_modules: TargetSpec = target_modules_field(what="Modules to adapt (Linear, Conv1d or Conv2d)")
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()
    rank_pattern: dict[str, int] = Field(default_factory=dict, description=f"Per-module ranks: {PATTERN_HELP}.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description=f"Per-module alphas: {PATTERN_HELP}.")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be -1 (split near the square root) or a positive integer, got {value}")
        return value

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _targets(cls, value):
        return value if value is None else check_target_spec(value)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict):
        return check_patterns(value)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m·n = dimension, exactly as HF PEFT's LoKr does (shapes must agree).

    A positive `factor` that divides the dimension is used as m as it is. Otherwise walk the divisors m upwards
    (n = dimension / m) while m < n and m does not exceed `factor` (no bound for -1), and return the pair
    smaller first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        step = m + 1
        while dimension % step:
            step += 1
        if step > bound:
            break
        m, n = step, dimension // step
    return (n, m) if m > n else (m, n)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _to_hf_config(params: LokrParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "LOKR",
        "r": params.r,
        "alpha": _number(params.alpha),
        "rank_dropout": params.rank_dropout,
        "rank_dropout_scale": params.rank_dropout_scale,
        "module_dropout": params.module_dropout,
        "use_effective_conv2d": params.use_effective_conv2d,
        "decompose_both": params.decompose_both,
        "decompose_factor": params.decompose_factor,
        # The resolved full names, so any reader adapts exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "init_weights": "lycoris" if params.init == "lycoris" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(params.rank_pattern),
        "alpha_pattern": {k: _number(v) for k, v in params.alpha_pattern.items()},
        "modules_to_save": list(params.modules_to_save) or None,
    }


# Our field -> HF PEFT's key. Missing keys take our defaults, which equal HF PEFT's
# (tests/tuners/test_interop_hf_peft.py checks it).
HF_FIELDS = {
    name: name
    for name in (
        "r", "alpha", "rank_dropout", "rank_dropout_scale", "module_dropout", "use_effective_conv2d",
        "decompose_both", "decompose_factor", "rank_pattern", "alpha_pattern",
    )
}  # fmt: skip


def _from_hf_config(cfg: dict) -> LokrParams:
    check_hf_config(cfg, "LoKr")
    # init_weights only shapes the starting point; a saved adapter's tensors replace it, so any value loads.
    return LokrParams(
        init="lycoris" if cfg.get("init_weights") == "lycoris" else "default",
        target_modules=cfg["target_modules"],
        **hf_fields(cfg, HF_FIELDS),
    )


SPEC = register_tuner(
    TunerSpec(
        name="lokr",
        summary="Kronecker product of two (optionally low-rank) factors on linear and conv layers",
        params=LokrParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear", "Conv1d", "Conv2d"),
            mergeable=True,
            quantized_base=True,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.lokr.layers",
        peft_type="LOKR",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
