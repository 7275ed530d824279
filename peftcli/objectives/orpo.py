"""orpo: odds-ratio preference optimisation, SFT on the chosen answer plus an odds-ratio term; no reference."""

from __future__ import annotations

from typing import Literal

from peftcli.objectives.registry import ObjectiveCapabilities, ObjectiveOptions, ObjectiveSpec, beta_field, register


class OrpoOptions(ObjectiveOptions):
    name: Literal["orpo"] = "orpo"
    beta: float = beta_field(0.1, "Weight of the odds-ratio term beside the chosen answer's cross-entropy (lambda).")


SPEC = register(
    ObjectiveSpec(
        name="orpo",
        summary="odds-ratio preference optimisation: chosen-answer cross-entropy plus an odds-ratio term",
        options=OrpoOptions,
        capabilities=ObjectiveCapabilities(data="pairs", reference=False),
    )
)
