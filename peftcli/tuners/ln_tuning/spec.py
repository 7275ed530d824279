"""LayerNorm tuning: each targeted normalisation layer gets a trainable copy that replaces it in the forward pass."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import TargetSpec, check_target_spec, exclude_modules_field, modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner
from peftcli.tuners.targets import ALL_LINEAR


class LNTuningParams(StrictModel):
    """Recipe options of the `ln_tuning` method."""

    name: Literal["ln_tuning"] = Field("ln_tuning", description="Method name: LayerNorm tuning.")
    target_modules: TargetSpec | None = Field(
        None,
        description="Modules to tune: a list matched on whole dotted-name suffixes (input_layernorm matches "
        "model.layers.0.input_layernorm) or a regex matched against the full name. null: every normalisation "
        "layer (class name ending in LayerNorm or RMSNorm: nn.LayerNorm, LlamaRMSNorm, T5LayerNorm, ...).",
    )
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _valid_targets(cls, value):
        if value == ALL_LINEAR:
            raise ValueError(
                "'all-linear' does not apply to ln_tuning; leave target_modules null to tune every "
                "normalisation layer, or name the modules"
            )
        return value if value is None else check_target_spec(value)


def _to_hf_config(params: LNTuningParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "LN_TUNING",
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
    }


def _from_hf_config(cfg: dict) -> LNTuningParams:
    return LNTuningParams(
        target_modules=cfg.get("target_modules"),
        exclude_modules=cfg.get("exclude_modules") or None,
        modules_to_save=cfg.get("modules_to_save") or [],
    )


SPEC = register_tuner(
    TunerSpec(
        name="ln_tuning",
        summary="LayerNorm tuning: trains a copy of each normalisation layer",
        params=LNTuningParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=(),  # normalisation layers, found by class name rather than by LAYER_TYPES
            mergeable=True,
            quantized_base=True,
            # The trainable copy is made from the base layer's tensors, which ZeRO-3 has already partitioned.
            zero3_safe=False,
        ),
        implementation="peftcli.tuners.ln_tuning.layers",
        peft_type="LN_TUNING",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        sharded_refusal="its trainable copies are made from the base norms' whole tensors",
    )
)
