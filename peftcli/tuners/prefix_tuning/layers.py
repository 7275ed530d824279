"""Prefix tuning on any transformers model: a trainable key/value prefix, handed to the model as its cache."""

from __future__ import annotations

import torch
from torch import nn

from peftcli.tuners.prefix_tuning.spec import SPEC, PrefixTuningParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.virtual_tokens import (
    PROMPT_ATTR,
    PromptSource,
    check_task,
    install_virtual_tokens,
    prompt_adapter_tensors,
    prompt_load_tensors,
    prompt_shape,
)

TABLE_PARAM = f"{PROMPT_ATTR}.embedding.weight"


class PrefixEncoder(PromptSource):
    """The prefix: one row per virtual token holding every layer's key and value (layer-major, key first).

    Without projection the rows are the trainable parameter; with it, per-token embeddings go through a
    two-layer tanh MLP (HF PEFT's layer layout).
    """

    def __init__(self, tokens: int, kv_width: int, num_layers: int, hidden: int | None, device: torch.device):
        out = num_layers * 2 * kv_width
        super().__init__((tokens, out))
        kw = {"device": device, "dtype": torch.float32}
        self.projection = hidden is not None
        if self.projection:
            self.embedding = nn.Embedding(tokens, kv_width, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_width, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out, **kw))
        else:
            self.embedding = nn.Embedding(tokens, out, **kw)

    def encode(self) -> torch.Tensor:
        rows = self.embedding(self.indices)
        return self.transform(rows) if self.projection else rows

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.table_shape[0]}, width={self.table_shape[1]}, projection={self.projection}"


def apply_method(model: nn.Module, params: PrefixTuningParams, context: AdapterContext) -> AppliedMethod:
    """Add a trainable `num_virtual_tokens`-long key/value prefix to every attention layer."""
    check_task(SPEC, context.task)
    shape = prompt_shape(model, params.num_virtual_tokens, context.task, prefix=True)
    hidden = (params.encoder_hidden_size or shape.token_dim) if params.projection else None
    device = model.get_input_embeddings().weight.device
    source = PrefixEncoder(shape.num_virtual_tokens, shape.token_dim, shape.num_layers, hidden, device)
    install_virtual_tokens(model, source, shape, context.task, "prefix")
    extra = {**shape.config_fields(), "encoder_hidden_size": params.encoder_hidden_size or shape.token_dim}
    return AppliedMethod(targeted=[], config_extra=extra)


def adapter_tensors(
    model: nn.Module, params: PrefixTuningParams, named: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """HF PEFT's layout: the prefix (after the projection, if any) as `prompt_embeddings`."""
    return prompt_adapter_tensors(model, named)


def load_tensors(
    model: nn.Module, params: PrefixTuningParams, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of adapter_tensors; with projection the model uses the saved prefix, bypassing the MLP."""
    projection = getattr(model, PROMPT_ATTR).projection
    return prompt_load_tensors(model, tensors, table_param=None if projection else TABLE_PARAM)


METHOD = MethodImplementation(apply_method=apply_method, adapter_tensors=adapter_tensors, load_tensors=load_tensors)
