"""dpo: direct preference optimisation against the starting policy, with its usual loss variants."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.objectives.registry import (
    ObjectiveCapabilities,
    ObjectiveOptions,
    ObjectiveSpec,
    beta_field,
    reference_field,
    register,
)


class DpoOptions(ObjectiveOptions):
    name: Literal["dpo"] = "dpo"
    beta: float = beta_field(0.1, "Strength of the pull towards the reference policy (IPO: its tau).")
    reference: Literal["auto", "live", "precomputed"] = reference_field()
    loss: Literal["sigmoid", "ipo", "robust", "hinge"] = Field(
        "sigmoid",
        description="sigmoid (the DPO paper), ipo (squared, on per-token log-ratios), robust (for noisy "
        "preference labels, with label_smoothing), hinge (SLiC).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="robust: the assumed share of pairs whose preference label is flipped."
    )

    @model_validator(mode="after")
    def _smoothing_is_for_robust(self) -> DpoOptions:
        if self.label_smoothing and self.loss != "robust":
            raise ValueError(f"objective.label_smoothing: only the robust loss uses it, not {self.loss}")
        return self


SPEC = register(
    ObjectiveSpec(
        name="dpo",
        summary="direct preference optimisation on chosen/rejected pairs, against the starting policy",
        options=DpoOptions,
        capabilities=ObjectiveCapabilities(data="pairs", reference=True),
    )
)
