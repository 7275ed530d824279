"""P-tuning: virtual-token embeddings produced by a small trainable encoder (an MLP, or an LSTM and an MLP)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

# Task heads that every classification adapter trains anyway; HF PEFT lists them in modules_to_save.
_AUTOMATIC_HEADS = ("classifier", "score")
MLP_LAYERS = 2  # the MLP encoder always has two hidden layers (as in HF PEFT)


class PTuningParams(StrictModel):
    """Recipe options of the `p_tuning` method."""

    name: Literal["p_tuning"] = Field("p_tuning", description="Method name: P-tuning (prompt encoder).")
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens placed before every input.")
    encoder_reparameterization_type: Literal["mlp", "lstm"] = Field(
        "mlp",
        description="The encoder that turns trainable token embeddings into the prompt: mlp (two hidden ReLU "
        "layers) or lstm (a bidirectional LSTM followed by a one-hidden-layer MLP).",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden width of the encoder; null: the model's hidden size."
    )
    encoder_num_layers: int = Field(
        MLP_LAYERS, gt=0, description="Stacked LSTM layers (lstm only; the mlp always has two hidden layers)."
    )
    encoder_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout between stacked LSTM layers (lstm with 2+ layers only)."
    )
    modules_to_save: list[str] = modules_to_save_field()

    @model_validator(mode="after")
    def _lstm_only_options(self):
        if self.encoder_reparameterization_type == "mlp":
            if self.encoder_num_layers != MLP_LAYERS:
                raise ValueError(
                    f"encoder_num_layers: only used by the lstm encoder (the mlp always has {MLP_LAYERS} hidden "
                    "layers); set encoder_reparameterization_type: lstm or drop it"
                )
            if self.encoder_dropout > 0:
                raise ValueError(
                    "encoder_dropout: only used between the lstm encoder's layers (the mlp has no dropout); "
                    "set encoder_reparameterization_type: lstm or drop it"
                )
        elif self.encoder_dropout > 0 and self.encoder_num_layers < 2:
            raise ValueError("encoder_dropout: acts between stacked LSTM layers; set encoder_num_layers >= 2 or 0.0")
        return self


def _to_hf_config(params: PTuningParams, targeted: list[str]) -> dict:
    # The model's sizes and the resolved encoder_hidden_size come from apply_method (config_extra).
    return {
        "peft_type": "P_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "encoder_reparameterization_type": params.encoder_reparameterization_type.upper(),
        "encoder_hidden_size": params.encoder_hidden_size,
        "encoder_num_layers": params.encoder_num_layers,
        "encoder_dropout": params.encoder_dropout,
        "modules_to_save": list(params.modules_to_save) or None,
    }


def _from_hf_config(cfg: dict) -> PTuningParams:
    kind = str(cfg.get("encoder_reparameterization_type") or "MLP").lower()
    if kind not in ("mlp", "lstm"):
        raise ValueError(f"P-tuning option encoder_reparameterization_type={kind.upper()!r} is not MLP or LSTM")
    lstm = kind == "lstm"
    layers = int(cfg.get("encoder_num_layers") or MLP_LAYERS) if lstm else MLP_LAYERS  # HF ignores it for MLP
    dropout = float(cfg.get("encoder_dropout") or 0.0) if lstm and layers > 1 else 0.0  # inactive otherwise
    return PTuningParams(
        num_virtual_tokens=cfg["num_virtual_tokens"],
        encoder_reparameterization_type=kind,
        encoder_hidden_size=cfg.get("encoder_hidden_size"),
        encoder_num_layers=layers,
        encoder_dropout=dropout,
        modules_to_save=[m for m in cfg.get("modules_to_save") or [] if m not in _AUTOMATIC_HEADS],
    )


SPEC = register_tuner(
    TunerSpec(
        name="p_tuning",
        summary="Virtual-token embeddings from a trainable MLP/LSTM encoder",
        params=PTuningParams,
        capabilities=Capabilities(
            kind="edits_inputs",
            layer_types=(),
            task_types=("causal_lm", "seq_cls", "seq2seq"),
            mergeable=False,
            quantized_base=True,
            zero3_safe=True,
            packing=False,  # one row holds several examples; the virtual tokens would come once, before the first
            activation_checkpointing=True,
        ),
        implementation="peftcli.tuners.p_tuning.layers",
        peft_type="P_TUNING",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        merge_refusal="P-tuning adds virtual tokens to the input rather than changing weights; "
        "serve the adapter with the base model instead (peft.PeftModel, or peftcli's load_adapter)",
    )
)
