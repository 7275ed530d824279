"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small down-activation-up block with a
residual, on the output of a block's attention and/or feed-forward layers. Hugging Face PEFT has no such method.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import TARGETS_HELP, TargetSpec, check_target_spec, modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

DEFAULT_REDUCTION_FACTOR = 16
SPEC_PEFT_TYPE = "PEFTCLI_BOTTLENECK"
MERGE_REFUSAL = (
    "a bottleneck adapter applies a non-linearity (down-projection, activation, up-projection) to a layer's output, "
    "so it cannot be folded into the base weights; serve the base model with the adapter loaded, "
    "or train a mergeable method (lora, loha, lokr) if you need a single merged model"
)


class BottleneckParams(StrictModel):
    """Recipe options of the `bottleneck` method."""

    name: Literal["bottleneck"] = "bottleneck"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer",
        description="houlsby: two adapters per block, after the attention output projection and after the "
        "feed-forward output; pfeiffer: one adapter per block, after the feed-forward output. "
        "The layers are found by model type; target_modules overrides this.",
    )
    reduction_factor: float | None = Field(
        None,
        gt=0,
        description=f"Hidden size divided by bottleneck size (the bottleneck is at least 1 wide). "
        f"Give this or bottleneck_size, not both; {DEFAULT_REDUCTION_FACTOR} when neither is given.",
    )
    bottleneck_size: int | None = Field(
        None,
        gt=0,
        description="Width of the bottleneck, the same for every adapted layer (instead of reduction_factor).",
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="Non-linearity between the down- and the up-projection."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (training only).")
    target_modules: TargetSpec | None = Field(
        None,
        description="Output layers to put an adapter on, instead of the placement's built-in choice for the "
        f"model type: {TARGETS_HELP}. Each must be a linear layer; the adapter works on its output.",
    )
    modules_to_save: list[str] = modules_to_save_field()

    @model_validator(mode="before")
    @classmethod
    def _one_size(cls, data):
        if not isinstance(data, dict):
            return data
        factor, size = data.get("reduction_factor"), data.get("bottleneck_size")
        if factor is not None and size is not None:
            raise ValueError(
                "give either reduction_factor or bottleneck_size, not both "
                f"(reduction_factor={factor}, bottleneck_size={size})"
            )
        if factor is None and size is None:
            return {**data, "reduction_factor": DEFAULT_REDUCTION_FACTOR}
        return data

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        return value if value is None else check_target_spec(value)

    def size_for(self, hidden: int) -> int:
        """The bottleneck width for a layer whose output has `hidden` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))


def _to_config(params: BottleneckParams, targeted: list[str]) -> dict:
    # The resolved module names are stored, so a reload adapts the same layers whatever the placement table says.
    config = params.model_dump(mode="json", exclude={"name"})
    return {"peft_type": SPEC_PEFT_TYPE, **config, "target_modules": sorted(targeted)}


SPEC = register_tuner(
    TunerSpec(
        name="bottleneck",
        summary="Bottleneck adapters (Houlsby, Pfeiffer) on attention/feed-forward outputs",
        params=BottleneckParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear",),
            mergeable=False,
            quantized_base=True,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.bottleneck.layers",
        peft_type=SPEC_PEFT_TYPE,
        to_hf_config=_to_config,
        merge_refusal=MERGE_REFUSAL,
    )
)
