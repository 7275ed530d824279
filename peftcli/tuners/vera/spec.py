"""VeRA: one pair of frozen random projections shared by every layer, and two trainable vectors per layer.

The update of a layer is diag(lambda_b) B diag(lambda_d) A, where A (r x max in_features) and B (max
out_features x r) are drawn once from `projection_prng_key` and sliced to the layer's size. lambda_b starts
at zero, so the model starts unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import (
    TargetSpec,
    check_target_spec,
    exclude_modules_field,
    modules_to_save_field,
    target_modules_field,
)
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner


class VeraParams(StrictModel):
    """Recipe options of the `vera` method."""

    name: Literal["vera"] = Field("vera", description="Method name: VeRA, vector-based random matrix adaptation.")
    r: int = Field(
        256,
        gt=0,
        description="Rank of the shared random projections. VeRA trains only r + out_features values per "
        "layer, so it affords far higher ranks than LoRA.",
    )
    d_initial: float = Field(
        0.1, description="Initial value of every lambda_d entry (small values, <= 0.1, work best)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the input of the VeRA branch.")
    projection_prng_key: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Seed of the shared projections A and B (drawn on the CPU, kaiming-uniform, as HF PEFT does).",
    )
    save_projection: bool = Field(
        True,
        description="Save A and B with the adapter (safe everywhere); false regenerates them from "
        "projection_prng_key when loading, which keeps the file small but relies on the same random generator.",
    )
    target_modules: TargetSpec = target_modules_field()
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        return value if value is None else check_target_spec(value)


def _to_hf_config(params: VeraParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "VERA",
        "r": params.r,
        # Saved as the resolved full names, so any reader targets exactly the trained modules (and sizes the
        # shared projections from the same layers).
        "target_modules": sorted(targeted),
        "projection_prng_key": params.projection_prng_key,
        "save_projection": params.save_projection,
        "vera_dropout": params.dropout,
        "d_initial": params.d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(params.modules_to_save) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _from_hf_config(cfg: dict) -> VeraParams:
    if (cfg.get("bias") or "none") != "none":
        raise ValueError(f"VeRA option bias={cfg['bias']!r} is not supported by this version of peftcli")
    if cfg.get("layers_to_transform") is not None:
        raise ValueError(
            f"VeRA option layers_to_transform={cfg['layers_to_transform']!r} is not supported by this version "
            "of peftcli"
        )
    return VeraParams(
        r=cfg.get("r", 256),
        d_initial=cfg.get("d_initial", 0.1),
        dropout=cfg.get("vera_dropout", 0.0),
        projection_prng_key=cfg.get("projection_prng_key", 0),
        save_projection=bool(cfg.get("save_projection", True)),
        target_modules=cfg["target_modules"],
        exclude_modules=cfg.get("exclude_modules") or None,
        modules_to_save=cfg.get("modules_to_save") or [],
    )


SPEC = register_tuner(
    TunerSpec(
        name="vera",
        summary="Shared frozen random projections with trainable per-layer scaling vectors",
        params=VeraParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear",),
            mergeable=True,
            quantized_base=True,
            # The shared projections are buffers, which ZeRO-3 does not partition (each rank holds them whole,
            # drawn from the same seed); the trainable vectors are read in the forward of the layer that owns them.
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.vera.layers",
        peft_type="VERA",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
