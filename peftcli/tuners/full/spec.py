"""Full fine-tuning: every base parameter is trained (optionally some modules kept frozen)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import TargetSpec, check_target_spec
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner
from peftcli.tuners.targets import ALL_LINEAR


class FullParams(StrictModel):
    """Recipe options of the `full` method."""

    name: Literal["full"] = Field("full", description="Method name: full fine-tuning.")
    exclude_modules: TargetSpec | None = Field(
        None,
        description="Modules kept frozen, e.g. [embed_tokens]: a list matched on whole dotted-name suffixes or a "
        "regex matched against the full name. A weight shared with another module (an LM head tied to the "
        "embeddings) stays frozen in both.",
    )

    @field_validator("exclude_modules")
    @classmethod
    def _valid_exclude(cls, value):
        if value == ALL_LINEAR:
            raise ValueError("'all-linear' is not an exclusion; name the modules to keep frozen")
        return value if value is None else check_target_spec(value)


SPEC = register_tuner(
    TunerSpec(
        name="full",
        summary="Full fine-tuning: trains every parameter of the base",
        params=FullParams,
        capabilities=Capabilities(
            kind="trains_base",
            layer_types=(),
            mergeable=True,  # the trained base tensors are the result: merging writes them over the base
            quantized_base=False,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.full.layers",
    )
)
