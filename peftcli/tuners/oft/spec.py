"""OFT: each targeted linear layer sees its input rotated by a trainable block-diagonal orthogonal matrix.

Every block is the Cayley transform of a skew-symmetric matrix whose upper-triangle entries are the trainable
parameters, so the layer starts as the identity (all entries zero) and stays norm-preserving. The on-disk
layout is HF PEFT's since 0.15 (`oft_R.weight`, one row of upper-triangle entries per block).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import (
    TargetSpec,
    check_target_spec,
    exclude_modules_field,
    modules_to_save_field,
    target_modules_field,
)
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

# The HF PEFT release whose OFT layout and Cayley-Neumann series we reproduce. HF reads `peft_version` to tell
# adapters trained with its older (pre-0.18) series apart, so our configs record the format they follow.
HF_FORMAT_VERSION = "0.21.2"
_NEUMANN_SINCE = (0, 18)


class OftParams(StrictModel):
    """Recipe options of the `oft` method."""

    name: Literal["oft"] = Field(
        "oft", description="Method name: OFT, orthogonal fine-tuning (block-diagonal rotations)."
    )
    r: int = Field(
        0,
        ge=0,
        description="Number of orthogonal blocks per layer; 0 derives it from block_size (in_features / "
        "block_size). Set r or block_size, not both: giving r alone sets block_size to 0.",
    )
    block_size: int = Field(
        32,
        ge=0,
        description="Size of each orthogonal block; 0 derives it from r. It must divide the in_features of "
        "every targeted layer (r x block_size = in_features).",
    )
    use_cayley_neumann: bool = Field(
        True,
        description="Approximate the Cayley transform's matrix inverse with a truncated Neumann series "
        "(faster, slightly less orthogonal); false solves the exact transform.",
    )
    num_cayley_neumann_terms: int = Field(
        5, ge=1, description="Terms of the Neumann series when use_cayley_neumann is true."
    )
    coft: bool = Field(
        False, description="Constrained OFT: keep each block's skew-symmetric matrix within a ball of radius eps."
    )
    eps: float = Field(6e-5, gt=0, description="Radius of the COFT constraint (only with coft: true).")
    block_share: bool = Field(False, description="One set of block parameters shared by all blocks of a layer.")
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="During training, this fraction of each layer's blocks is replaced by the identity.",
    )
    target_modules: TargetSpec = target_modules_field()
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        return value if value is None else check_target_spec(value)

    @field_validator("block_size")
    @classmethod
    def _block_of_one_is_empty(cls, value: int) -> int:
        if value == 1:
            raise ValueError("a block of size 1 has nothing to train (its skew-symmetric matrix is 0); use 2 or more")
        return value

    @model_validator(mode="before")
    @classmethod
    def _r_alone_clears_block_size(cls, data):
        # `r: 8` on its own means "8 blocks"; without this the block_size default would make both non-zero.
        if isinstance(data, dict) and data.get("r") and "block_size" not in data:
            data = {**data, "block_size": 0}
        return data

    @model_validator(mode="after")
    def _exactly_one_of_r_and_block_size(self):
        if self.r == 0 and self.block_size == 0:
            raise ValueError(
                "r and block_size are both 0: set one of them (e.g. block_size: 32); the other is derived "
                "from each layer's in_features"
            )
        if self.r != 0 and self.block_size != 0:
            raise ValueError(
                f"set either r ({self.r}) or block_size ({self.block_size}), not both: r x block_size must "
                "equal each layer's in_features, so one determines the other (set the other to 0)"
            )
        return self


def _to_hf_config(params: OftParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "OFT",
        "peft_version": HF_FORMAT_VERSION,
        "r": params.r,
        "oft_block_size": params.block_size,
        "module_dropout": params.module_dropout,
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "coft": params.coft,
        "eps": params.eps,
        "block_share": params.block_share,
        "use_cayley_neumann": params.use_cayley_neumann,
        "num_cayley_neumann_terms": params.num_cayley_neumann_terms,
    }


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.partition("@")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _from_hf_config(cfg: dict) -> OftParams:
    if "oft_block_size" not in cfg:
        raise ValueError(
            "this OFT adapter uses the layout of PEFT < 0.14, which stored whole rotation matrices; "
            "retrain it with a current PEFT or peftcli"
        )
    if (cfg.get("bias") or "none") != "none":
        raise ValueError(f"OFT option bias={cfg['bias']!r} is not supported by this version of peftcli")
    if cfg.get("layers_to_transform") is not None:
        raise ValueError(
            f"OFT option layers_to_transform={cfg['layers_to_transform']!r} is not supported by this version of peftcli"
        )
    neumann = bool(cfg.get("use_cayley_neumann", True))
    if neumann and _version_tuple(str(cfg.get("peft_version") or "0.0.0")) < _NEUMANN_SINCE:
        raise ValueError(
            "this OFT adapter was trained with the Cayley-Neumann series of PEFT < 0.18 (no peft_version >= 0.18 "
            "in its config), which differs from the current one; retrain it, or add the peft_version it was "
            "saved with if that is 0.18 or later"
        )
    return OftParams(
        r=cfg.get("r", 0),
        block_size=cfg.get("oft_block_size", 0),
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=cfg.get("num_cayley_neumann_terms", 5),
        coft=bool(cfg.get("coft", False)),
        eps=cfg.get("eps", 6e-5),
        block_share=bool(cfg.get("block_share", False)),
        module_dropout=cfg.get("module_dropout", 0.0),
        target_modules=cfg["target_modules"],
        exclude_modules=cfg.get("exclude_modules") or None,
        modules_to_save=cfg.get("modules_to_save") or [],
    )


SPEC = register_tuner(
    TunerSpec(
        name="oft",
        summary="Block-diagonal orthogonal rotation (Cayley transform) of each linear layer's input",
        params=OftParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear",),
            mergeable=True,
            quantized_base=True,
            # Its only parameter is read inside the forward of the submodule that owns it (oft_R), which is
            # what ZeRO-3's gather-on-forward hooks need.
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.oft.layers",
        peft_type="OFT",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
