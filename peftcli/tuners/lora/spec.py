"""LoRA: a low-rank update B·A added to targeted layers, scaled by alpha/r (or alpha/sqrt(r)).

Options: DoRA (magnitude/direction split), PiSSA/OLoRA initialisation (saved as a plain LoRA that fits the
original base), LoRA+ learning rates, per-module ranks and alphas, and a choice of transformer blocks.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import check_target_spec, hf_fields
from peftcli.tuners.lora.patterns import check_pattern_key
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner
from peftcli.tuners.targets import ALL_LINEAR

TargetSpec = list[str] | str
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
LayerIndex = Annotated[int, Field(ge=0)]

_INIT_RE = re.compile(r"default|gaussian|olora|pissa|pissa_niter_\d+")
# Initialisations that move the top of the base weight's spectrum into the adapter (W_res = W - s·B0·A0).
BASE_CHANGING_INITS = ("pissa", "olora")
_PATTERN_HELP = (
    "Keys are regexes matched at the end of the full module name on a dot boundary (q_proj matches "
    "model.layers.0.self_attn.q_proj, ^foo only a top-level foo); the first key that matches wins, as in HF PEFT."
)


def changes_base(init: str) -> bool:
    """True for initialisations that rewrite the base weight to a residual (PiSSA, OLoRA)."""
    return init.startswith(BASE_CHANGING_INITS)


class LoraParams(StrictModel):
    """Recipe options of the `lora` method."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the update matrices A (r x in) and B (out x r).")
    alpha: float = Field(16, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the input of the LoRA branch of linear and conv layers (embedding lookups have "
        "none, as in HF PEFT).",
    )
    target_modules: TargetSpec = Field(
        "all-linear",
        description="Modules to adapt: a list matched on whole dotted-name suffixes (q_proj matches "
        "model.layers.0.self_attn.q_proj), a regex matched against the full name, or 'all-linear' "
        "(every linear layer except the output head). Embedding, Conv1d and Conv2d layers are adapted when "
        "a list or regex names them.",
    )
    exclude_modules: TargetSpec | None = Field(
        None, description="Modules never to adapt, in the same forms as target_modules."
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        examples=[["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]],
        description="Parameters to adapt directly, matched on whole dotted-name suffixes: the fused 3-D expert "
        "weights of mixture-of-experts models (Mixtral, Qwen2-MoE, ... in transformers 5), which no layer wraps. "
        "Each expert gets its own rank-r update (HF PEFT's target_parameters). Needs dropout 0 and no DoRA; "
        "target_modules may then be [] to adapt the experts only.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (suffix match), e.g. [lm_head].",
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r.")
    init: str = Field(
        "default",
        examples=["default", "gaussian", "pissa", "pissa_niter_4", "olora"],
        description="default: A kaiming-uniform, B zero (identity at start); gaussian: A ~ N(0, 1/r), B zero; "
        "pissa: A and B from the top r singular vectors of the base weight (full SVD), which then keeps only "
        "the residual; pissa_niter_N: the same with a fast randomised SVD of N power iterations; olora: A and B "
        "from a QR decomposition. pissa/olora adapters are saved as plain LoRA of rank 2r that fits the original "
        "base. Embedding layers always start with A zero and B normal.",
    )
    dora: bool = Field(
        False,
        description="DoRA: split each adapted weight into a trained magnitude per output feature and a "
        "direction updated by LoRA (weight-decomposed low-rank adaptation).",
    )
    rank_pattern: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description=f"Ranks that differ from r, by module-name regex, e.g. {{'q_proj': 16}}. {_PATTERN_HELP}",
    )
    alpha_pattern: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description=f"Alphas that differ from alpha, by module-name regex. {_PATTERN_HELP}",
    )
    layers_to_transform: LayerIndex | list[LayerIndex] | None = Field(
        None,
        description="Adapt only these transformer blocks (an index or a list), e.g. [0, 1] for the first two. "
        "Works with a target list or all-linear, not with a regex.",
    )
    layers_pattern: str | list[str] | None = Field(
        None,
        description="Name of the block container before the index (layers, h, blocks, ...), used with "
        "layers_to_transform; unset takes the first number that follows a named segment (model.layers.3).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices (and other 1-D adapter tensors, as in HF PEFT) learn this many times "
        "faster than the recipe's learning rate; the paper suggests 2-16. Unset: one learning rate for all.",
    )
    loraplus_lr_embedding: float | None = Field(
        None,
        gt=0,
        description="LoRA+ with embedding layers adapted: their LoRA tensors' learning rate as a multiple of the "
        "recipe's learning rate (HF PEFT takes an absolute rate, 1e-6 by default). Unset: the recipe's rate. "
        "Needs loraplus_lr_ratio.",
    )

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        if value == []:
            return value  # target_modules: [] with target_parameters; checked below
        return check_target_spec(value)

    @field_validator("target_parameters")
    @classmethod
    def _named_parameters(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("entries must not be empty")
        return value

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if not _INIT_RE.fullmatch(value):
            raise ValueError(
                f"unknown init {value!r}: use default, gaussian, pissa, pissa_niter_N (a fast SVD with N power "
                "iterations, e.g. pissa_niter_4) or olora"
            )
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _valid_keys(cls, value: dict) -> dict:
        for key in value:
            check_pattern_key(key)
        return value

    @field_validator("layers_to_transform")
    @classmethod
    def _some_layers(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must list at least one layer index (or leave it unset to adapt every layer)")
        return value

    @field_validator("layers_pattern")
    @classmethod
    def _valid_layers_pattern(cls, value):
        for pattern in [value] if isinstance(value, str) else value or []:
            if not pattern:
                raise ValueError("must not be empty")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regex ({exc})") from None
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one pattern (or leave it unset)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        regex_target = isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the block indices to adapt)")
        if regex_target and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform works with a target_modules list or all-linear, not with a regex; "
                "put the layer numbers in the regex instead"
            )
        if self.loraplus_lr_embedding is not None and self.loraplus_lr_ratio is None:
            raise ValueError("loraplus_lr_embedding needs loraplus_lr_ratio (LoRA+ is off without it)")
        if self.target_modules == [] and not self.target_parameters:
            raise ValueError("target_modules must name at least one module (or use 'all-linear')")
        if self.exclude_modules == []:
            raise ValueError("exclude_modules must name at least one module (or leave it unset)")
        if self.target_parameters:
            # An update folded into the weight has no input to drop out, and DoRA/PiSSA need a layer's weight.
            for wrong, key in ((self.dropout > 0, "dropout: 0"), (self.dora, "dora: false")):
                if wrong:
                    raise ValueError(
                        f"target_parameters needs {key} (as in HF PEFT): the update is added to the "
                        "parameter itself, where there is no layer input or weight norm to work on"
                    )
            if changes_base(self.init):
                raise ValueError(f"target_parameters starts from init default or gaussian, not {self.init}")
        return self


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _hf_init(init: str):
    return {"default": True, "gaussian": "gaussian"}.get(init, init)


def _to_hf_config(params: LoraParams, targeted: list[str]) -> dict:
    return {
        "peft_type": "LORA",
        "r": params.r,
        "lora_alpha": _number(params.alpha),
        "lora_dropout": params.dropout,
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
        "use_rslora": params.rslora,
        # pissa/olora adapters are converted when saved; `config_updates` then records the plain LoRA.
        "init_lora_weights": _hf_init(params.init),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": params.dora,
        "rank_pattern": dict(params.rank_pattern),
        "alpha_pattern": {k: _number(v) for k, v in params.alpha_pattern.items()},
        "layers_to_transform": params.layers_to_transform,
        "layers_pattern": params.layers_pattern,
        "lora_bias": False,
        "target_parameters": None,  # the adapted ones are filled in from what apply_method matched
    }


_UNSUPPORTED_HF_LORA = {
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    # LoRA variants whose forward differs from plain LoRA (or that add tensors of their own).
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "use_qalora": False,
    "ensure_weight_tying": False,
}
# Initialisations that also rewrite the base weights (W - initial B·A): the saved A and B only fit that
# residual base, so loading them onto the plain base would silently give a different model.
_HF_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_neutral(value, neutral) -> bool:
    # `is False`, not `== False`: layers_to_transform=0 (only layer 0) is a real setting.
    return value is None or value is False or value in ({}, []) or (type(value) is type(neutral) and value == neutral)


# Our field -> HF PEFT's key; missing keys take our defaults, which equal HF PEFT's except where hf_defaults says
HF_FIELDS = {
    "alpha": "lora_alpha", "dropout": "lora_dropout", "target_parameters": "target_parameters", "rslora": "use_rslora",
    "dora": "use_dora", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
}  # fmt: skip


def _from_hf_config(cfg: dict) -> LoraParams:
    for key, neutral in _UNSUPPORTED_HF_LORA.items():
        value = cfg.get(key, neutral)
        if not _is_neutral(value, neutral):
            raise ValueError(f"LoRA option {key}={value!r} is not supported by this version of peftcli")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_HF_BASE_CHANGING_INITS):
        raise ValueError(
            f"LoRA option init_lora_weights={init!r} changes the base weights, so this adapter only fits the "
            "modified base; convert it to a plain LoRA adapter first (HF PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    layers = cfg.get("layers_to_transform")
    return LoraParams(
        r=cfg["r"],
        target_modules=cfg.get("target_modules") or ([] if cfg.get("target_parameters") else cfg["target_modules"]),
        # The weights are read from the file, so any other (base-preserving) init loads as default.
        init="gaussian" if init == "gaussian" else "default",
        layers_to_transform=None if layers == [] else layers,
        layers_pattern=(cfg.get("layers_pattern") or None) if layers not in (None, []) else None,
        **hf_fields(cfg, HF_FIELDS, hf_defaults={"alpha": 8}),  # HF PEFT's lora_alpha defaults to 8, ours to 16
    )


def _quantized_check(params: LoraParams) -> str | None:
    """PiSSA/OLoRA rewrite the base weight to the residual, which a frozen quantized base cannot take."""
    if changes_base(params.init):
        return (
            f"method.init: {params.init} rewrites the base weights, which model.quantization keeps as frozen "
            "integer blocks; use init: default or gaussian, or train without quantization"
        )
    return None


def _sharded_check(params: LoraParams, engine) -> str | None:
    """DoRA and LoRA on parameters read the whole base weight in the wrapper's forward, outside the module
    that ZeRO-3 gathers."""
    if engine.kind != "deepspeed" or engine.zero_stage != 3:
        return None
    if params.dora:
        return (
            "method.dora: DoRA reads each layer's whole base weight in every forward, which DeepSpeed ZeRO-3 keeps "
            "partitioned; use launch.preset zero2 or fsdp2, or set dora: false"
        )
    if params.target_parameters:
        return (
            "method.target_parameters: LoRA reads each adapted parameter whole before its module's forward, where "
            "DeepSpeed ZeRO-3 still keeps it partitioned; use launch.preset zero2 or fsdp2"
        )
    return None


SPEC = register_tuner(
    TunerSpec(
        name="lora",
        summary="Low-rank update B·A on linear, embedding and conv layers (DoRA, PiSSA/OLoRA, LoRA+)",
        params=LoraParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear", "Embedding", "Conv1d", "Conv2d"),
            mergeable=True,
            quantized_base=True,
            zero3_safe=True,
        ),
        implementation="peftcli.tuners.lora.layers",
        peft_type="LORA",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        quantized_check=_quantized_check,
        sharded_check=_sharded_check,
        # PiSSA/OLoRA start from the whole base weight: under ZeRO-3 the base is then loaded whole
        starts_from_base_weights=lambda params: changes_base(params.init),
    )
)
