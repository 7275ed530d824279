"""Causal-LM cross-entropy without the full logits: the output head is applied to the last hidden state in
chunks, and only where a label exists.

A (batch, length, vocabulary) logits tensor is the largest activation of a small model's step (SmolLM2: 49k
vocabulary, 4 bytes a logit, twice with its gradient), and with completion-only loss about half of it is
never used. Here the model runs as usual, through whatever wraps it (DDP, FSDP2, DeepSpeed), but its output
head returns a placeholder and hands over its input instead; the loss then takes the labelled positions, a
chunk at a time, through the same head module (adapted, trained or tied: whatever the model's head is), the
model's own logit post-processing (soft-capping, scaling) and cross-entropy. Each chunk is recomputed in the
backward pass rather than kept, so memory holds one chunk's logits.

Families whose forward changes logits in ways not listed here are caught by the start-up probe, which
compares these logits with the full path's (`train/fast_path.py`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftcli.train.losses import next_token_targets

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


class HeadUnsupported(Exception):
    """The model's logits do not come from its output head module in a way the chunked loss can follow."""


class OutputHead:
    """The model's output head, able to stand aside during a forward and to compute logits for chosen rows."""

    def __init__(self, model):
        self.module = model.get_output_embeddings()
        if self.module is None:
            raise HeadUnsupported("the model has no output embeddings module")
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.multiply = getattr(config, "logit_scale", None)  # Cohere multiplies the logits
        self.divide = getattr(config, "logits_scaling", None)  # Granite divides them
        vocabulary = getattr(self.module, "out_features", None) or config.vocab_size
        self.chunk_tokens = max(64, CHUNK_BYTES // (4 * vocabulary))
        self.captured: torch.Tensor | None = None

    @contextmanager
    def standing_aside(self):
        """Within: the head stores its input and returns a (..., 1) placeholder instead of logits."""

        def capture(hidden, *args, **kwargs):
            self.captured = hidden
            # Tied to the hidden state, so the model's output stays part of the graph: engines that hook
            # the forward's outputs (FSDP2's pre-backward) still see the backward pass go through them.
            return hidden[..., :1] * 0

        self.captured = None
        self.module.forward = capture  # an instance attribute: hooks (ZeRO-3 gathering) still run around it
        try:
            yield
        finally:
            del self.module.forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden rows, post-processed as the model's own forward does."""
        logits = self.module(hidden).float()
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states (batch, length, hidden) of a forward, the head's input, and the forward's
        placeholder output, which the loss must include (times zero) to keep the graph through the output."""
        with self.standing_aside():
            output = model(**inputs).logits
        hidden = self.captured
        self.captured = None
        if hidden is None:
            raise HeadUnsupported("the model's forward does not call its output head module")
        if hidden.shape[:2] != labels.shape:
            raise HeadUnsupported(
                f"the head's input has shape {tuple(hidden.shape[:2])}, not the labels' {tuple(labels.shape)}"
            )
        return hidden, output


def chunked_loss_sums(head: OutputHead, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of next-token cross-entropy and label counts of a forward, one chunk of logits at a time.

    Position t predicts labels[t + 1]; only positions with such a label go through the head.
    """
    hidden, placeholder = head.hidden_states(model, inputs, labels)
    targets, keep = next_token_targets(labels)
    rows, row_of = hidden[keep], keep.nonzero()[:, 0]
    targets = targets[keep]

    def chunk_losses(rows_part: torch.Tensor, targets_part: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(rows_part), targets_part, reduction="none")

    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32) + placeholder.float().sum() * 0
    size = head.chunk_tokens
    recompute = torch.is_grad_enabled() and rows.shape[0] > size  # one chunk: keeping it costs no more
    for start in range(0, rows.shape[0], size):
        part = (rows[start : start + size], targets[start : start + size])
        losses = checkpoint(chunk_losses, *part, use_reentrant=False) if recompute else chunk_losses(*part)
        sums = sums.index_add(0, row_of[start : start + size], losses)
    return sums, keep.sum(dim=1)
