"""LoHa (FedPara, Hyeon-Woo et al. 2021): ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r, the Hadamard product of two
low-rank products, whose rank can reach r² at the cost of 2r. Same tensors and adapter_config.json as HF PEFT's LOHA.
"""

from __future__ import annotations

import re
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
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

PATTERN_HELP = (
    "{regex: value} for modules that differ from the default; a key matches a module when it matches a whole "
    "dotted-name suffix (q_proj, layers\\.0\\..*_proj; ^ anchors at the start of the full name); the first "
    "matching key wins, as in HF PEFT"
)


class LohaParams(StrictModel):
    """Recipe options of the `loha` method."""

    name: Literal["loha"] = "loha"
    r: int = Field(8, gt=0, description="Rank of each of the two low-rank products.")
    alpha: float = Field(8, gt=0, description="Scale numerator: ΔW is multiplied by alpha / r.")
    rank_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Training only: probability of zeroing each output row of ΔW; kept rows are divided by the "
        "share kept.",
    )
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Training only: probability of skipping a layer's whole update in a forward."
    )
    use_effective_conv2d: bool = Field(
        False,
        description="Conv1d/Conv2d layers with a kernel larger than 1: factor the kernel through an r x r core "
        "(FedPara's Proposition 3) instead of flattening it into the input dimension.",
    )
    target_modules: TargetSpec = target_modules_field(what="Modules to adapt (Linear, Conv1d or Conv2d)")
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()
    rank_pattern: dict[str, int] = Field(default_factory=dict, description=f"Per-module ranks: {PATTERN_HELP}.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description=f"Per-module alphas: {PATTERN_HELP}.")

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _targets(cls, value):
        return value if value is None else check_target_spec(value)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict):
        return check_patterns(value)


def check_patterns(patterns: dict) -> dict:
    """Validator body for rank/alpha patterns: non-empty, compilable keys and positive values."""
    for key, value in patterns.items():
        if not key.strip():
            raise ValueError("a pattern key must not be empty")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{key!r} is not a valid regex ({exc})") from None
        if value <= 0:
            raise ValueError(f"{key!r}: the value must be > 0, got {value}")
    return patterns


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _to_hf_config(params: LohaParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "LOHA",
        "r": params.r,
        "alpha": _number(params.alpha),
        "rank_dropout": params.rank_dropout,
        "module_dropout": params.module_dropout,
        "use_effective_conv2d": params.use_effective_conv2d,
        # The resolved full names, so any reader adapts exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(params.rank_pattern),
        "alpha_pattern": {k: _number(v) for k, v in params.alpha_pattern.items()},
        "modules_to_save": list(params.modules_to_save) or None,
    }


def check_hf_config(cfg: dict, method: str) -> None:
    """Refuse HF PEFT LyCORIS options peftcli does not reproduce."""
    for key in ("layers_to_transform", "layers_pattern"):
        value = cfg.get(key)
        if value is not None and value != []:
            raise ValueError(f"{method} option {key}={value!r} is not supported by this version of peftcli")
    if cfg.get("target_modules") is None:
        raise ValueError(
            f"{method} adapter has target_modules=null (HF PEFT's per-architecture default), which peftcli does "
            "not resolve; write the module names into target_modules"
        )


# Our field -> HF PEFT's key. Missing keys take our defaults, which equal HF PEFT's
# (tests/tuners/test_interop_hf_peft.py checks it).
HF_FIELDS = {
    name: name
    for name in (
        "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "rank_pattern", "alpha_pattern"
    )
}  # fmt: skip


def _from_hf_config(cfg: dict) -> LohaParams:
    check_hf_config(cfg, "LoHa")
    # init_weights only shapes the starting point; a saved adapter's tensors replace it, so any value loads.
    return LohaParams(target_modules=cfg["target_modules"], **hf_fields(cfg, HF_FIELDS))


SPEC = register_tuner(
    TunerSpec(
        name="loha",
        summary="Hadamard product of two low-rank updates on linear and conv layers",
        params=LohaParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear", "Conv1d", "Conv2d"),
            mergeable=True,
            quantized_base=True,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.loha.layers",
        peft_type="LOHA",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
