"""AdaLoRA: LoRA in SVD form, P diag(E) Q, whose singular triplets are pruned to a rank budget during training.

Each targeted layer starts with `init_r` triplets. After `tinit` warm-up steps the total budget falls on a
cubic schedule to `target_r` per layer on average until `total_step - tfinal`; every `delta_t` steps the
least important triplets (importance: smoothed |param x grad| times its uncertainty) get their singular
value zeroed. The last `tfinal` steps train with the final ranks fixed. The kept ranks are saved as
`rank_pattern` in adapter_config.json, and the saved tensors keep only those triplets, as in HF PEFT.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import (
    TargetSpec,
    check_target_spec,
    exclude_modules_field,
    hf_fields,
    modules_to_save_field,
    target_modules_field,
)
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

_DORA_KEYS = ("use_dora", "dora")
_LOFTQ_KEYS = ("loftq_config", "loftq")


class AdaLoraParams(StrictModel):
    """Recipe options of the `adalora` method."""

    name: Literal["adalora"] = Field("adalora", description="Method name: AdaLoRA, LoRA with adaptive rank allocation.")
    init_r: int = Field(12, gt=0, description="Rank every targeted layer starts with.")
    target_r: int = Field(
        8, gt=0, description="Average rank per layer after pruning (the final budget is target_r x layers)."
    )
    alpha: float = Field(
        8,
        gt=0,
        description="Scale numerator: the update is multiplied by alpha / init_r (init_r stays the divisor "
        "while ranks are pruned, as in HF PEFT).",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the input of the AdaLoRA branch.")
    tinit: int = Field(0, ge=0, description="Warm-up steps before any pruning.")
    tfinal: int = Field(0, ge=0, description="Final steps that train with the ranks fixed (a duration).")
    delta_t: int = Field(1, ge=1, description="Prune every delta_t steps during the budgeting phase.")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the importance (sensitivity) estimate.")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the uncertainty estimate.")
    orth_reg_weight: float = Field(
        0.5, ge=0.0, description="Weight of the penalty that keeps P and Q orthogonal (added to the training loss)."
    )
    total_step: int | None = Field(
        None,
        gt=0,
        description="Length of the rank schedule in optimizer steps; null: the run's training length "
        "(training.max_steps, or what the epochs amount to).",
    )
    target_modules: TargetSpec = target_modules_field()
    exclude_modules: TargetSpec | None = exclude_modules_field()
    modules_to_save: list[str] = modules_to_save_field()
    rank_pattern: dict[str, list[bool]] | None = Field(
        None,
        description="Which triplets each layer kept, by '<module>.lora_E' (recorded by training into "
        "adapter_config.json; leave it unset in recipes).",
    )

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _non_empty(cls, value):
        return value if value is None else check_target_spec(value)

    @model_validator(mode="before")
    @classmethod
    def _no_dora_or_loftq(cls, data):
        if isinstance(data, dict):
            if any(data.get(key) for key in _DORA_KEYS):
                raise ValueError("AdaLoRA does not support DoRA; use method lora with DoRA instead")
            if any(data.get(key) for key in _LOFTQ_KEYS) or data.get("init") == "loftq":
                raise ValueError("AdaLoRA does not support LoftQ initialisation")
        return data

    @model_validator(mode="after")
    def _schedule_is_consistent(self):
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r ({self.target_r}) is larger than init_r ({self.init_r}): AdaLoRA only prunes ranks, "
                "so raise init_r or lower target_r"
            )
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit ({self.tinit}) and tfinal ({self.tfinal}) leave no budgeting phase in total_step "
                f"({self.total_step}) steps: pruning runs from step tinit to total_step - tfinal, so lower "
                "tinit or tfinal, or raise total_step"
            )
        if self.rank_pattern is not None:
            wrong = [key for key, kept in self.rank_pattern.items() if len(kept) != self.init_r]
            if wrong:
                raise ValueError(
                    f"rank_pattern entry {wrong[0]} has {len(self.rank_pattern[wrong[0]])} flags, "
                    f"not init_r ({self.init_r})"
                )
        return self


def _to_hf_config(params: AdaLoraParams, targeted: list[str]) -> dict:
    # total_step and rank_pattern are also written by layers.config_updates once they are known.
    return {
        "peft_type": "ADALORA",
        "init_r": params.init_r,
        "target_r": params.target_r,
        "lora_alpha": int(params.alpha) if float(params.alpha).is_integer() else params.alpha,
        "lora_dropout": params.dropout,
        "tinit": params.tinit,
        "tfinal": params.tfinal,
        "deltaT": params.delta_t,
        "beta1": params.beta1,
        "beta2": params.beta2,
        "orth_reg_weight": params.orth_reg_weight,
        "total_step": params.total_step,
        "rank_pattern": params.rank_pattern,
        # Saved as the resolved full names, so any reader targets exactly the trained modules.
        "target_modules": sorted(targeted),
        "exclude_modules": None,
        "modules_to_save": list(params.modules_to_save) or None,
        "r": 8,  # LoraConfig's field, unused by AdaLoRA (HF PEFT warns when it differs from 8)
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "loftq_config": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }


# HF AdaLoRA options that would change what the adapter computes or which modules it covers.
_UNSUPPORTED_HF_ADALORA = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


# Our field -> HF PEFT's key. Missing keys take our defaults, which equal HF PEFT's
# (tests/tuners/test_interop_hf_peft.py checks it).
HF_FIELDS = {
    "init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "tinit": "tinit",
    "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight",
    "total_step": "total_step",
}  # fmt: skip


def _from_hf_config(cfg: dict) -> AdaLoraParams:
    for key, neutral in _UNSUPPORTED_HF_ADALORA.items():
        value = cfg.get(key, neutral)
        if value is not None and value is not False and value != neutral and value not in ({}, []):
            raise ValueError(f"AdaLoRA option {key}={value!r} is not supported by this version of peftcli")
    if cfg.get("loftq_config"):
        raise ValueError("AdaLoRA option loftq_config is not supported (HF PEFT refuses it too)")
    # use_rslora, alpha_pattern and init_lora_weights are accepted: HF PEFT's AdaLoRA layers ignore the first
    # two, and initialisation does not matter for a loaded adapter.
    return AdaLoraParams(
        target_modules=cfg["target_modules"],
        rank_pattern=_pattern_keys_without_adapter_name(cfg.get("rank_pattern")),
        **hf_fields(cfg, HF_FIELDS),
    )


def _pattern_keys_without_adapter_name(pattern: dict | None) -> dict | None:
    # HF PEFT strips the adapter name ('.default') when it saves; tolerate a config written without stripping.
    if not pattern:
        return None
    return {
        key.rpartition(".lora_E")[0] + ".lora_E" if ".lora_E" in key else key: kept for key, kept in pattern.items()
    }


SPEC = register_tuner(
    TunerSpec(
        name="adalora",
        summary="LoRA in SVD form with importance-based rank pruning to a budget (AdaLoRA)",
        params=AdaLoraParams,
        capabilities=Capabilities(
            kind="wraps_layers",
            layer_types=("Linear",),
            mergeable=True,
            quantized_base=True,
            # Rank allocation reads every adapter parameter's full gradient after the optimizer step; ZeRO-3
            # and FSDP keep only a shard of it on each rank (HF PEFT needs DeepSpeed's own gather for this),
            # and the pruning masks must then be identical on every rank. Untested there, so not claimed.
            zero3_safe=False,
        ),
        implementation="peftcli.tuners.adalora.layers",
        peft_type="ADALORA",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        sharded_refusal="rank allocation reads every adapter parameter's whole gradient after each step",
        deepspeed_refusal="rank allocation reads each parameter's gradient after the optimizer step, which "
        "DeepSpeed keeps in its own partitioned buffers",
    )
)
