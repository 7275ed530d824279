"""Prompt tuning: trainable virtual-token embeddings placed in front of the input embeddings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.recipe.base import StrictModel
from peftcli.tuners.common import modules_to_save_field
from peftcli.tuners.registry import Capabilities, TunerSpec, register_tuner

# Task heads that every classification adapter trains anyway; HF PEFT lists them in modules_to_save.
_AUTOMATIC_HEADS = ("classifier", "score")
_HF_INIT = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}


class PromptTuningParams(StrictModel):
    """Recipe options of the `prompt_tuning` method."""

    name: Literal["prompt_tuning"] = Field("prompt_tuning", description="Method name: soft prompt tuning.")
    num_virtual_tokens: int = Field(
        20, gt=0, description="Trainable virtual tokens placed before every input (each one embedding vector)."
    )
    init: Literal["random", "text", "sample_vocab"] = Field(
        "random",
        description="random: N(0, 1) vectors; text: the embeddings of init_text's tokens, repeated or cut to "
        "num_virtual_tokens; sample_vocab: the embeddings of random vocabulary tokens.",
    )
    init_text: str | None = Field(
        None, description="Text whose token embeddings start the prompt (with init: text), e.g. a task instruction."
    )
    modules_to_save: list[str] = modules_to_save_field()

    @model_validator(mode="after")
    def _init_text_iff_text_init(self):
        has_text = self.init_text is not None and bool(self.init_text.strip())
        if self.init == "text" and not has_text:
            raise ValueError("init_text: required (non-empty) when init is 'text'")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text: only used with init: text (init is '{self.init}'); set init: text or drop it")
        return self


def _to_hf_config(params: PromptTuningParams, targeted: list[str]) -> dict:
    # The model's sizes (token_dim, num_layers, ...) and the tokenizer path come from apply_method (config_extra).
    return {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "prompt_tuning_init": _HF_INIT[params.init],
        "prompt_tuning_init_text": params.init_text,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": list(params.modules_to_save) or None,
    }


def _from_hf_config(cfg: dict) -> PromptTuningParams:
    # The initialisation only matters before training: a saved adapter's values replace it. Text
    # initialisation is read as random so that loading an adapter never needs the tokenizer.
    init = str(cfg.get("prompt_tuning_init") or "RANDOM").lower()
    return PromptTuningParams(
        num_virtual_tokens=cfg["num_virtual_tokens"],
        init="sample_vocab" if init == "sample_vocab" else "random",
        modules_to_save=[m for m in cfg.get("modules_to_save") or [] if m not in _AUTOMATIC_HEADS],
    )


SPEC = register_tuner(
    TunerSpec(
        name="prompt_tuning",
        summary="Trainable virtual-token embeddings in front of the input",
        params=PromptTuningParams,
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
        implementation="peftcli.tuners.prompt_tuning.layers",
        peft_type="PROMPT_TUNING",
        in_hf_peft=True,
        to_hf_config=_to_hf_config,
        from_hf_config=_from_hf_config,
        merge_refusal="prompt tuning adds virtual tokens to the input rather than changing weights; "
        "serve the adapter with the base model instead (peft.PeftModel, or peftcli's load_adapter)",
    )
)
