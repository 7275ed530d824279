"""Prompt tuning on any transformers model: one trainable embedding table, prepended through forward hooks."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.tuners.prompt_tuning.spec import SPEC, PromptTuningParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.virtual_tokens import (
    PROMPT_ATTR,
    PromptSource,
    check_task,
    gathered,
    install_virtual_tokens,
    prompt_adapter_tensors,
    prompt_load_tensors,
    prompt_shape,
)

TABLE_PARAM = f"{PROMPT_ATTR}.embedding.weight"


class PromptEmbedding(PromptSource):
    """The virtual-token vectors themselves: the table is the trainable parameter."""

    def __init__(self, rows: int, width: int, device: torch.device, initial: torch.Tensor | None = None):
        super().__init__((rows, width))
        self.embedding = nn.Embedding(rows, width, device=device, dtype=torch.float32)  # N(0, 1) entries
        if initial is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(initial)

    def encode(self) -> torch.Tensor:
        return self.embedding(self.indices)

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.table_shape[0]}, width={self.table_shape[1]}"


def text_token_ids(tokenizer, text: str, rows: int) -> list[int]:
    """The tokens of `text`, repeated or cut to `rows` (as HF PEFT initialises from text)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise PeftCliError(f"method.init_text: the tokenizer turns {text!r} into no tokens; use a longer text")
    return (ids * math.ceil(rows / len(ids)))[:rows]


def initial_table(model: nn.Module, params: PromptTuningParams, rows: int, tokenizer) -> torch.Tensor | None:
    """Starting vectors for the text and sample_vocab initialisations (None for random)."""
    embed = model.get_input_embeddings()
    if params.init == "random" or embed.weight.is_meta:  # a meta model (peft targets) holds no values anyway
        return None
    if params.init == "text":
        if tokenizer is None:
            raise PeftCliError(
                "method.init: text initialisation needs the model's tokenizer, and none was given; "
                "use init: random or pass the tokenizer (AdapterContext.tokenizer)"
            )
        ids = torch.tensor(text_token_ids(tokenizer, params.init_text, rows))
    else:
        ids = torch.randint(0, embed.num_embeddings, (rows,))
    with torch.no_grad(), gathered(embed.parameters()):
        return embed(ids.to(embed.weight.device)).float()


def apply_method(model: nn.Module, params: PromptTuningParams, context: AdapterContext) -> AppliedMethod:
    """Add `num_virtual_tokens` trainable embeddings in front of every input."""
    check_task(SPEC, context.task)
    shape = prompt_shape(model, params.num_virtual_tokens, context.task)
    rows = shape.total_tokens
    device = model.get_input_embeddings().weight.device
    source = PromptEmbedding(rows, shape.token_dim, device, initial_table(model, params, rows, context.tokenizer))
    install_virtual_tokens(model, source, shape, context.task, "embeds")
    extra = shape.config_fields()
    if params.init == "text":
        # HF PEFT's config requires it with text initialisation (it re-reads the tokenizer when training).
        extra["tokenizer_name_or_path"] = getattr(context.tokenizer, "name_or_path", None) or "unknown"
    return AppliedMethod(targeted=[], config_extra=extra)


def adapter_tensors(
    model: nn.Module, params: PromptTuningParams, named: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """HF PEFT's layout: the table as `prompt_embeddings`, trained heads as `base_model.<name>`."""
    return prompt_adapter_tensors(model, named)


def load_tensors(
    model: nn.Module, params: PromptTuningParams, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of adapter_tensors: `prompt_embeddings` is the embedding table."""
    return prompt_load_tensors(model, tensors, table_param=TABLE_PARAM)


METHOD = MethodImplementation(apply_method=apply_method, adapter_tensors=adapter_tensors, load_tensors=load_tensors)
