"""simpo: simple preference optimisation on length-normalised log-probabilities with a margin; no reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.objectives.registry import ObjectiveCapabilities, ObjectiveOptions, ObjectiveSpec, beta_field, register


class SimpoOptions(ObjectiveOptions):
    name: Literal["simpo"] = "simpo"
    beta: float = beta_field(2.0, "Scale of the per-token log-probability difference.")
    gamma_beta_ratio: float = Field(0.5, ge=0, le=100, description="The target margin gamma, as a multiple of beta.")
    sft_weight: float = Field(0.0, ge=0, le=100, description="Weight of an added chosen-answer cross-entropy.")


SPEC = register(
    ObjectiveSpec(
        name="simpo",
        summary="simple preference optimisation: average log-probabilities with a target margin",
        options=SimpoOptions,
        capabilities=ObjectiveCapabilities(data="pairs", reference=False),
    )
)
