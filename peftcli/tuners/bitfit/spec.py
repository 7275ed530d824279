"""BitFit: train only the base model's bias vectors (all of them, or those of the named modules)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import TargetSpec, check_target_spec, exclude_modules_field, modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner


class BitFitParams(StrictModel):
    """Recipe options of the `bitfit` method."""

    name: Literal["bitfit"] = Field("bitfit", description="Method name: BitFit (bias-only fine-tuning).")
    target_modules: TargetSpec | None = Field(
        None,
        description="Modules whose biases are trained: a list matched on whole dotted-name suffixes "
        "(query matches bert.encoder.layer.0.attention.self.query), a regex matched against the full name, or "
        "'all-linear' (the biases of every linear layer except the output head). null: every bias of the model, "
        "normalisation layers included.",
    )
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        return value if value is None else check_target_spec(value)


SPEC = register_tuner(
    TunerSpec(
        name="bitfit",
        summary="BitFit: trains only the base model's biases",
        params=BitFitParams,
        capabilities=Capabilities(
            kind="trains_base",
            layer_types=(),
            mergeable=True,  # the trained biases are the result: merging writes them over the base
            quantized_base=False,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.bitfit.layers",
        # Model-dependent: Llama, Mistral and T5 have no biases, and applying BitFit to them is an error.
        model_requirement="bias parameters (BERT, RoBERTa, GPT-2, Qwen2 attention; not Llama or T5)",
    )
)
