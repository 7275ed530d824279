"""The objective registry: each objective's recipe options, what it needs, and a one-line summary.

Importing this module imports no torch: recipe validation and `peft objectives` stay instant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field

from peftcli.recipe.base import StrictModel

BUILT_IN = ("sft", "dpo", "orpo", "simpo", "kto")


# The data format each kind of preference objective trains on.
DATA_FORMATS = {"pairs": "preference", "unpaired": "unpaired_preference"}


class ObjectiveOptions(StrictModel):
    """Base of every objective's options (unknown keys are errors, as everywhere in a recipe)."""


@dataclass(frozen=True)
class ObjectiveCapabilities:
    """What an objective needs; validation and the loop read these instead of asking 'is this dpo?'."""

    reference: bool  # compares with the starting policy's log-probabilities
    # What it trains on: the task's own formats, preference pairs (format `preference`), or unpaired examples
    # labelled desirable or undesirable (format `unpaired_preference`).
    data: Literal["task", "pairs", "unpaired"] = "task"
    tasks: tuple[str, ...] = ("causal_lm",)

    @property
    def preference_data(self) -> bool:
        """Trains on preference data of either kind (pairs or unpaired examples), not on the task's formats."""
        return self.data != "task"

    @property
    def data_format(self) -> str | None:
        """The one data format it trains on (None: any of the task's formats)."""
        return DATA_FORMATS.get(self.data)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    summary: str
    options: type[ObjectiveOptions]
    capabilities: ObjectiveCapabilities


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def all_objectives() -> dict[str, ObjectiveSpec]:
    """Every registered objective, by name (the built-in ones imported on first use)."""
    for name in BUILT_IN:
        importlib.import_module(f"peftcli.objectives.{name}")
    return dict(_REGISTRY)


def get_objective(name: str) -> ObjectiveSpec:
    objectives = all_objectives()
    if name not in objectives:
        raise KeyError(f"unknown objective {name!r}; choose one of {', '.join(objectives)}")
    return objectives[name]


def objective_union():
    """The recipe's `objective:` type: one options model per objective, told apart by `name`."""
    models = tuple(spec.options for spec in all_objectives().values())
    return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple of types)


def beta_field(default: float, what: str):
    return Field(default, gt=0, le=1000, description=what)


def reference_field():
    return Field(
        "auto",
        description="How the starting policy's log-probabilities are had. live: its trainable tensors are kept "
        "and swapped in for a no-grad forward each step. precomputed: one pass over the data before the first "
        "step, kept in the run directory (no second forward per step, no copy of the trainable tensors; works "
        "when parameters are sharded). auto: precomputed for methods that train base weights and under sharded "
        "presets (zero3, fsdp2), else live.",
    )


def reference_mode(chosen: str, trains_base: bool, sharded: bool) -> str:
    """live or precomputed, for an objective's `reference` option (auto resolved by method and launch)."""
    if chosen != "auto":
        return chosen
    return "precomputed" if trains_base or sharded else "live"
