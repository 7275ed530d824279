"""LoRA: a low-rank update B·A added to each targeted linear layer, scaled by alpha/r (or alpha/sqrt(r))."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

TargetSpec = list[str] | str


class LoraParams(StrictModel):
    """Recipe options of the `lora` method."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the update matrices A (r x in) and B (out x r).")
    alpha: float = Field(16, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the input of the LoRA branch.")
    target_modules: TargetSpec = Field(
        "all-linear",
        description="Modules to adapt: a list matched on whole dotted-name suffixes (q_proj matches "
        "model.layers.0.self_attn.q_proj), a regex matched against the full name, or 'all-linear' "
        "(every linear layer except the output head).",
    )
    exclude_modules: TargetSpec | None = Field(
        None, description="Modules never to adapt, in the same forms as target_modules."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (suffix match), e.g. [lm_head].",
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="default: A kaiming-uniform, B zero (identity at start); gaussian: A ~ N(0, 1/r), B zero.",
    )

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module (or use 'all-linear')")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value


def _to_hf_config(params: LoraParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "LORA",
        "r": params.r,
        "lora_alpha": int(params.alpha) if float(params.alpha).is_integer() else params.alpha,
        "lora_dropout": params.dropout,
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
        "use_rslora": params.rslora,
        "init_lora_weights": True if params.init == "default" else "gaussian",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }


_UNSUPPORTED_HF_LORA = {
    "use_dora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    # LoRA variants whose forward differs from plain LoRA (or that add tensors of their own).
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
}
# Initialisations that also rewrite the base weights (W - initial B·A): the saved A and B only fit that
# residual base, so loading them onto the plain base would silently give a different model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_neutral(value, neutral) -> bool:
    # `is False`, not `== False`: layers_to_transform=0 (only layer 0) is a real setting.
    return value is None or value is False or value in ({}, []) or (type(value) is type(neutral) and value == neutral)


def _from_hf_config(cfg: dict) -> LoraParams:
    for key, neutral in _UNSUPPORTED_HF_LORA.items():
        value = cfg.get(key, neutral)
        if not _is_neutral(value, neutral):
            raise ValueError(f"LoRA option {key}={value!r} is not supported by this version of peftcli")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"LoRA option init_lora_weights={init!r} changes the base weights, so this adapter only fits the "
            "modified base; convert it to a plain LoRA adapter first (HF PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    return LoraParams(
        r=cfg["r"],
        alpha=cfg.get("lora_alpha", 8),
        dropout=cfg.get("lora_dropout", 0.0),
        target_modules=cfg["target_modules"],
        exclude_modules=cfg.get("exclude_modules") or None,
        modules_to_save=cfg.get("modules_to_save") or [],
        rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "default",
    )


SPEC = register_tuner(
    TunerSpec(
        name="lora",
        summary="Low-rank update B·A on linear layers",
        params=LoraParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear",),
            mergeable=True,
            quantized_base=False,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.lora.layers",
        peft_type="LORA",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
    )
)
