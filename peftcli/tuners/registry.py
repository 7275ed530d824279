"""The tuner registry: one `register_tuner` call per method, discovered from the subpackages of `tuners`.

Everything here is torch-free so that recipe validation and `peft --help` stay fast; the torch side of a
method is imported only when a model is built (`load_implementation`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

TaskType = Literal["causal_lm", "seq_cls", "token_cls", "seq2seq"]
TASK_TYPES: tuple[str, ...] = ("causal_lm", "seq_cls", "token_cls", "seq2seq")
# wraps_layers: adds its own layers around base modules (LoRA, IA3, adapters); edits_inputs: adds virtual
# tokens or attention prefixes (prompt, prefix, P-tuning); trains_base: unfreezes base tensors (BitFit, full).
MethodKind = Literal["wraps_layers", "edits_inputs", "trains_base"]


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; validation, merge and export read these instead of asking 'is this X?'."""

    kind: MethodKind
    layer_types: tuple[str, ...]  # LAYER_TYPES keys it can wrap; () for methods that wrap nothing
    task_types: tuple[str, ...] = TASK_TYPES
    mergeable: bool = False
    quantized_base: bool = False
    zero3_safe: bool = False
    activation_checkpointing: bool = True  # False where recomputation breaks the method (prefix caches)
    packing: bool = True  # False where the method cannot train on packed rows (data.packing)


@dataclass(frozen=True)
class TunerSpec:
    """A registered method: its recipe params model, capabilities and how it maps to adapter_config.json.

    `peft_type` is what adapter_config.json records. When `in_hf_peft` is True it is HF PEFT's own type and
    `to_hf_config`/`from_hf_config` translate to and from HF's fields, so either library loads the other's
    adapters. Methods HF PEFT lacks use a `PEFTCLI_` type and, by default, store their params as they are.
    """

    name: str
    summary: str
    params: type[BaseModel]
    capabilities: Capabilities
    implementation: str  # module with the torch side: see tuners/protocol.py
    peft_type: str = ""
    in_hf_peft: bool = False
    to_hf_config: Callable[[Any, list[str]], dict] | None = None
    from_hf_config: Callable[[dict], Any] | None = None
    # Why the method cannot be merged, and what to do instead (methods that are not mergeable).
    merge_refusal: str | None = None
    # Why it is unsafe when parameters are sharded (ZeRO-3, FSDP), for methods not zero3_safe.
    sharded_refusal: str | None = None
    # Why it cannot train under DeepSpeed at all (any stage).
    deepspeed_refusal: str | None = None
    # What a model must have for the method to find anything (BitFit: biases), for `peft methods`.
    model_requirement: str | None = None
    # Checks of the method's params against the rest of the recipe: a refusal naming the key, or None.
    quantized_check: Callable[[Any], str | None] | None = None  # params, on a quantized base
    sharded_check: Callable[[Any, Any], str | None] | None = None  # params, engine (launch.presets.Engine)
    # Whether, with these params, the method starts from the whole base weights (PiSSA): ZeRO-3 then builds
    # the base whole in each process instead of partitioned.
    starts_from_base_weights: Callable[[Any], bool] | None = None

    def __post_init__(self):
        if not self.peft_type:
            object.__setattr__(self, "peft_type", f"PEFTCLI_{self.name.upper()}")
        if self.in_hf_peft and (self.to_hf_config is None or self.from_hf_config is None):
            raise ValueError(f"tuner {self.name!r} is in HF PEFT, so it needs to_hf_config and from_hf_config")
        if self.to_hf_config is None:
            object.__setattr__(self, "to_hf_config", _params_as_config(self))
        if self.from_hf_config is None:
            object.__setattr__(self, "from_hf_config", _params_from_config(self))


def _params_as_config(spec: TunerSpec) -> Callable[[Any, list[str]], dict]:
    def to_config(params, targeted: list[str]) -> dict:
        return {"peft_type": spec.peft_type, **params.model_dump(mode="json", exclude={"name"})}

    return to_config


_COMMON_CONFIG_KEYS = {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode"}


def _params_from_config(spec: TunerSpec) -> Callable[[dict], Any]:
    def from_config(config: dict):
        fields = {k: v for k, v in config.items() if k not in _COMMON_CONFIG_KEYS and k != "auto_mapping"}
        if "modules_to_save" not in spec.params.model_fields:  # the task head, recorded for every method
            fields.pop("modules_to_save", None)
        return spec.params(**fields)

    return from_config


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


def tuner_for_peft_type(peft_type: str) -> TunerSpec | None:
    """The method that reads adapters saved with this `peft_type` (by HF PEFT or by us)."""
    for spec in all_tuners().values():
        if spec.peft_type == peft_type:
            return spec
    return None


def load_implementation(name: str):
    """The torch side of a method: the `METHOD` its layers module declares (a MethodImplementation)."""
    return importlib.import_module(get_tuner(name).implementation).METHOD
