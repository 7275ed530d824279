"""P-tuning on any transformers model: token embeddings through an MLP (or LSTM + MLP), prepended through hooks."""

from __future__ import annotations

import torch
from torch import nn

from peftcli.tuners.p_tuning.spec import SPEC, PTuningParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.virtual_tokens import (
    PromptSource,
    check_task,
    install_virtual_tokens,
    prompt_adapter_tensors,
    prompt_load_tensors,
    prompt_shape,
)


class PromptEncoder(PromptSource):
    """Trainable token embeddings and the encoder that turns them into the prompt (HF PEFT's layer layout)."""

    def __init__(self, rows: int, width: int, params: PTuningParams, device: torch.device):
        super().__init__((rows, width))
        hidden = params.encoder_hidden_size or width
        self.kind = params.encoder_reparameterization_type
        kw = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Embedding(rows, width, **kw)
        if self.kind == "lstm":
            self.lstm_head = nn.LSTM(
                input_size=width,
                hidden_size=hidden,
                num_layers=params.encoder_num_layers,
                dropout=params.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                **kw,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(), nn.Linear(2 * hidden, width, **kw)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden, **kw),
                nn.ReLU(),
                nn.Linear(hidden, hidden, **kw),
                nn.ReLU(),
                nn.Linear(hidden, width, **kw),
            )

    def encode(self) -> torch.Tensor:
        # One sequence of all the virtual tokens: the LSTM reads them in order, both ways.
        embeds = self.embedding(self.indices).unsqueeze(0)
        if self.kind == "lstm":
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)[0]

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.table_shape[0]}, width={self.table_shape[1]}, encoder={self.kind}"


def apply_method(model: nn.Module, params: PTuningParams, context: AdapterContext) -> AppliedMethod:
    """Add `num_virtual_tokens` virtual tokens whose embeddings an encoder computes from trainable vectors."""
    check_task(SPEC, context.task)
    shape = prompt_shape(model, params.num_virtual_tokens, context.task)
    device = model.get_input_embeddings().weight.device
    source = PromptEncoder(shape.total_tokens, shape.token_dim, params, device)
    install_virtual_tokens(model, source, shape, context.task, "embeds")
    extra = {**shape.config_fields(), "encoder_hidden_size": params.encoder_hidden_size or shape.token_dim}
    return AppliedMethod(targeted=[], config_extra=extra)


def adapter_tensors(model: nn.Module, params: PTuningParams, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF PEFT's layout: the encoder's output as `prompt_embeddings` (the encoder itself is not saved)."""
    return prompt_adapter_tensors(model, named)


def load_tensors(model: nn.Module, params: PTuningParams, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of adapter_tensors: the model uses the saved prompt from now on, bypassing the encoder."""
    return prompt_load_tensors(model, tensors)


METHOD = MethodImplementation(apply_method=apply_method, adapter_tensors=adapter_tensors, load_tensors=load_tensors)
