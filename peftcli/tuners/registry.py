"""The tuner registry: one `register_tuner` call per method, discovered from the subpackages of `tuners`.

Everything here is torch-free so that recipe validation and `peft --help` stay fast; the torch side of a
method is imported only when a model is built (`load_implementation`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

TaskType = Literal["causal_lm"]
MethodKind = Literal["wraps_layers", "edits_inputs", "trains_base"]


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; validation, merge and export read these instead of asking 'is this X?'."""

    kind: MethodKind
    layer_types: tuple[str, ...]
    task_types: tuple[str, ...] = ("causal_lm",)
    mergeable: bool = False
    quantized_base: bool = False
    zero3_safe: bool = False


@dataclass(frozen=True)
class TunerSpec:
    """A registered method: its recipe params model, capabilities and how it maps to the HF PEFT format."""

    name: str
    summary: str
    params: type[BaseModel]
    capabilities: Capabilities
    implementation: str  # module with the torch side; it must define `apply_method` and friends
    hf_peft_type: str | None = None  # e.g. "LORA"; None when HF PEFT has no such method
    to_hf_config: Callable[[Any, list[str]], dict] | None = None
    from_hf_config: Callable[[dict], Any] | None = None
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, TunerSpec] = {}
_DISCOVERED = False


def register_tuner(spec: TunerSpec) -> TunerSpec:
    """Add a method to the registry; names must be unique and match the params model's `name` literal."""
    if spec.name in _REGISTRY:
        raise ValueError(f"tuner {spec.name!r} is registered twice")
    name_field = spec.params.model_fields.get("name")
    if name_field is None or name_field.default != spec.name:
        raise ValueError(f"params model of {spec.name!r} needs `name: Literal[{spec.name!r}] = {spec.name!r}`")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("peftcli.tuners")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.ispkg:
            importlib.import_module(f"peftcli.tuners.{info.name}.spec")


def all_tuners() -> dict[str, TunerSpec]:
    """Every registered method, by name, in name order."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_tuner(name: str) -> TunerSpec:
    """The spec of one method; KeyError if unknown."""
    return all_tuners()[name]


def tuner_for_hf_peft_type(peft_type: str) -> TunerSpec | None:
    """The method that reads adapters HF PEFT saved with this `peft_type`."""
    for spec in all_tuners().values():
        if spec.hf_peft_type == peft_type:
            return spec
    return None


def load_implementation(name: str):
    """Import the torch side of a method."""
    return importlib.import_module(get_tuner(name).implementation)
