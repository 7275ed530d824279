"""IA3: a learned vector rescales each targeted layer's output (or, for feed-forward layers, its input)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import TargetSpec, check_target_spec, exclude_modules_field, modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

# Default targets by `config.model_type`: the attention keys and values plus the feed-forward output layer,
# as in the IA3 paper; the feed-forward layer is scaled on its input. Our own table (it differs from HF
# PEFT's for some models, which does not matter: saved adapters record the resolved module names).
_DECODER = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_ENCODER = (["key", "value", "output.dense"], ["output.dense"])
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2"), _DECODER
    ),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),  # fused q/k/v projection
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _ENCODER),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    **dict.fromkeys(("t5", "mt5"), (["k", "v", "wo"], ["wo"])),
    **dict.fromkeys(("opt", "bart"), (["k_proj", "v_proj", "fc2"], ["fc2"])),
    **dict.fromkeys(("gpt_neox", "falcon"), (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # Conv1D layers; c_attn is the fused q/k/v projection
}


def is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """Whether a targeted module counts as feed-forward, exactly as HF PEFT decides it.

    A regex must match the full name; a list entry matches when the name ends with it as plain text (not on
    a dot boundary, unlike target_modules), which is what HF PEFT does and so what its adapters mean.
    """
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(entry) for entry in feedforward)


class IA3Params(StrictModel):
    """Recipe options of the `ia3` method."""

    name: Literal["ia3"] = Field("ia3", description="Method name: (IA)^3 learned rescaling vectors.")
    target_modules: TargetSpec | None = Field(
        None,
        description="Modules to rescale: a list matched on whole dotted-name suffixes (k_proj matches "
        "model.layers.0.self_attn.k_proj), a regex matched against the full name, or 'all-linear'. "
        "null: the built-in defaults for the model's architecture (Llama-like: k_proj, v_proj, down_proj; "
        "BERT: key, value, output.dense; T5: k, v, wo).",
    )
    feedforward_modules: TargetSpec | None = Field(
        None,
        description="Targeted modules scaled on their input instead of their output (the feed-forward output "
        "layers of the paper). A list entry marks every targeted module whose name ends with it, a string is "
        "a regex matched against the full name (both as HF PEFT). Must be a subset of target_modules. "
        "null: the architecture's defaults (down_proj, output.dense, wo, ...) where they are targeted; [] for none.",
    )
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()
    init: Literal["ones", "random"] = Field(
        "ones",
        description="ones: every vector starts at 1 (the model starts unchanged); random: N(0, 1) entries, "
        "for tests only.",
    )

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        return value if value is None else check_target_spec(value)

    @field_validator("feedforward_modules")
    @classmethod
    def _valid_feedforward(cls, value, info: ValidationInfo):
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty (use [] for no feed-forward modules)")
        outside = _outside_targets(value, info.data.get("target_modules"))
        if outside:
            raise ValueError(_SUBSET_MESSAGE.format(", ".join(outside)))
        return value

    @model_validator(mode="after")
    def _feedforward_within_targets(self):
        # Also on assignment (validate_assignment), where target_modules may change after feedforward_modules.
        outside = _outside_targets(self.feedforward_modules, self.target_modules)
        if outside:
            raise ValueError("feedforward_modules " + _SUBSET_MESSAGE.format(", ".join(outside)))
        return self


_SUBSET_MESSAGE = (
    "must be a subset of target_modules: {} is not in target_modules; add it there or remove it from "
    "feedforward_modules"
)


def _outside_targets(feedforward, targets) -> list[str]:
    """Feed-forward list entries missing from the target list (checked when both are lists, as HF PEFT does)."""
    if isinstance(feedforward, list) and isinstance(targets, list):
        return [entry for entry in feedforward if entry not in targets]
    return []


def _to_hf_config(params: IA3Params, targeted: list[str]) -> dict:
    # The resolved feed-forward names come from apply_method (config_extra), which overrides this
    # best-effort value: with defaults, only the model knows which targeted modules are feed-forward.
    ff = params.feedforward_modules
    if ff is not None:
        ff = sorted(name for name in targeted if is_feedforward(name, ff))
    return {
        "peft_type": "IA3",
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "feedforward_modules": ff,
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
        "fan_in_fan_out": False,
        "init_ia3_weights": params.init == "ones",
    }


def _from_hf_config(cfg: dict) -> IA3Params:
    targets, feedforward = cfg.get("target_modules"), cfg.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        # HF PEFT writes 'all-linear' out as full names but keeps short feed-forward names. The same rule as
        # a regex (name ends with an entry) keeps HF's meaning; it is checked against the model when applied.
        feedforward = ".*(?:" + "|".join(re.escape(entry) for entry in feedforward) + ")"
    return IA3Params(
        target_modules=targets,
        feedforward_modules=feedforward,
        exclude_modules=cfg.get("exclude_modules") or None,
        modules_to_save=cfg.get("modules_to_save") or [],
        init="ones" if cfg.get("init_ia3_weights", True) else "random",
    )


SPEC = register_tuner(
    TunerSpec(
        name="ia3",
        summary="(IA)^3: learned vectors rescale layer outputs (feed-forward layers: inputs)",
        params=IA3Params,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear", "Conv2d"),
            mergeable=True,
            quantized_base=True,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.ia3.layers",
        peft_type="IA3",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
