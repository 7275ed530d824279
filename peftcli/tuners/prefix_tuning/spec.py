"""Prefix tuning: trainable keys and values placed before the input in every attention layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

# Task heads that every classification adapter trains anyway; HF PEFT lists them in modules_to_save.
_AUTOMATIC_HEADS = ("classifier", "score")


class PrefixTuningParams(StrictModel):
    """Recipe options of the `prefix_tuning` method."""

    name: Literal["prefix_tuning"] = Field("prefix_tuning", description="Method name: prefix tuning.")
    num_virtual_tokens: int = Field(
        20, gt=0, description="Length of the prefix: key/value positions added in front of every attention layer."
    )
    projection: bool = Field(
        False,
        description="Reparametrise the prefix during training: per-token embeddings through a two-layer tanh MLP "
        "(HF prefix_projection). Often trains more stably; the saved adapter holds only the resulting prefix.",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden width of the projection MLP (projection only); null: the key/value width."
    )
    modules_to_save: list[str] = modules_to_save_field()

    @model_validator(mode="after")
    def _hidden_size_needs_projection(self):
        if self.encoder_hidden_size is not None and not self.projection:
            raise ValueError("encoder_hidden_size: only used with projection: true; set projection or drop it")
        return self


def _to_hf_config(params: PrefixTuningParams, targeted: list[str]) -> dict:
    # The model's sizes and the resolved encoder_hidden_size come from apply_method (config_extra).
    return {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "prefix_projection": params.projection,
        "encoder_hidden_size": params.encoder_hidden_size,
        "init_weights": None,
        "modules_to_save": list(params.modules_to_save) or None,
    }


def _from_hf_config(cfg: dict) -> PrefixTuningParams:
    # init_weights ("zero" or null) only decides the starting values, which a saved adapter replaces.
    projection = bool(cfg.get("prefix_projection", False))
    return PrefixTuningParams(
        num_virtual_tokens=cfg["num_virtual_tokens"],
        projection=projection,
        encoder_hidden_size=cfg.get("encoder_hidden_size") if projection else None,
        modules_to_save=[m for m in cfg.get("modules_to_save") or [] if m not in _AUTOMATIC_HEADS],
    )


SPEC = register_tuner(
    TunerSpec(
        name="prefix_tuning",
        summary="Trainable keys and values in front of every attention layer",
        params=PrefixTuningParams,
        capabilities=Capabilities(
            kind="edits_inputs",
            layer_types=(),
            task_types=("causal_lm", "seq_cls", "seq2seq"),
            mergeable=False,
            quantized_base=True,
            zero3_safe=True,
            packing=False,  # one row holds several examples; the virtual tokens would come once, before the first
            # The prefix lives in the attention cache, which recomputation (checkpointing) would extend twice.
            activation_checkpointing=False,
        ),
        implementation="peftcli.tuners.prefix_tuning.layers",
        peft_type="PREFIX_TUNING",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        merge_refusal="prefix tuning adds keys and values to the attention cache rather than changing "
        "weights; serve the adapter with the base model instead (peft.PeftModel, or peftcli's load_adapter)",
    )
)
