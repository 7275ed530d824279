"""kto: Kahneman-Tversky optimisation on unpaired examples, each labelled desirable or undesirable, against the
starting policy; a reference point (the KL estimate) comes from mismatched prompt/completion rows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.objectives.registry import (
    ObjectiveCapabilities,
    ObjectiveOptions,
    ObjectiveSpec,
    beta_field,
    reference_field,
    register,
)


class KtoOptions(ObjectiveOptions):
    name: Literal["kto"] = "kto"
    beta: float = beta_field(0.1, "Scale of the log-ratio to the reference policy inside the sigmoid.")
    reference: Literal["auto", "live", "precomputed"] = reference_field()
    desirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of each desirable example's loss (raise it when desirable examples are the fewer).",
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of each undesirable example's loss (raise it when undesirable examples are the fewer).",
    )


SPEC = register(
    ObjectiveSpec(
        name="kto",
        summary="Kahneman-Tversky optimisation on unpaired examples labelled desirable or undesirable, against "
        "the starting policy",
        options=KtoOptions,
        capabilities=ObjectiveCapabilities(data="unpaired", reference=True),
    )
)
