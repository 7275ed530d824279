"""Freeze tuning: train only named parts of the base model (some transformer blocks, some of their modules)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner


class FreezeParams(StrictModel):
    """Recipe options of the `freeze` method."""

    name: Literal["freeze"] = Field("freeze", description="Method name: freeze tuning (train chosen base blocks).")
    layers: list[int] | None = Field(
        default_factory=lambda: [-2, -1],
        description="Indices of the transformer blocks to train; negative ones count from the end ([-2, -1], the "
        "default: the last two). The block list is found by name (model.layers, encoder.layer, h, block); in an "
        "encoder-decoder the indices apply to each stack. null: every block; []: none (train extra_modules only).",
    )
    modules: list[str] | None = Field(
        None,
        description="Parts of the chosen blocks to train, as dotted-name suffixes inside a block, e.g. [mlp] or "
        "[self_attn]. null: the whole block.",
    )
    extra_modules: list[str] = Field(
        default_factory=list,
        description="Modules outside the blocks to train too (dotted-name suffix match), e.g. [embed_tokens, norm].",
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value):
        repeated = sorted({i for i in value if value.count(i) > 1}) if value else []
        if repeated:
            raise ValueError(f"block index {repeated[0]} is listed twice")
        return value

    @field_validator("modules", "extra_modules")
    @classmethod
    def _names_not_blank(cls, value):
        if value is not None and not all(entry.strip() for entry in value):
            raise ValueError("module names must not be empty")
        return value

    @field_validator("modules")
    @classmethod
    def _modules_not_empty(cls, value):
        if value is not None and not value:
            raise ValueError("must name at least one module (or be null for whole blocks)")
        return value

    @model_validator(mode="after")
    def _something_to_train(self):
        if self.layers == [] and self.modules is not None:
            raise ValueError("modules picks parts of the chosen blocks, but layers is empty; name the blocks")
        if self.layers == [] and not self.extra_modules:
            raise ValueError("freeze trains nothing: layers is empty and extra_modules names no module")
        return self


SPEC = register_tuner(
    TunerSpec(
        name="freeze",
        summary="Freeze tuning: trains chosen transformer blocks (or parts of them) of the base",
        params=FreezeParams,
        capabilities=Capabilities(
            kind="trains_base",
            layer_types=(),
            mergeable=True,  # the trained base tensors are the result: merging writes them over the base
            quantized_base=False,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.freeze.layers",
    )
)
