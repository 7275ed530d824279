"""The loss of one batch for each task type, as per-example sums and the label counts they cover.

Sums, not means: the loop divides by the label count of the whole accumulation window across processes, so
every label weighs the same whatever the padding, accumulation or world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcli.data.formats import IGNORE_INDEX

GENERATIVE_TASKS = ("causal_lm", "seq2seq")


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What each position predicts (labels[t + 1], -100 at the end) and where that is a label."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, targets != IGNORE_INDEX


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of token cross-entropy and the number of label tokens; `shift` predicts the next token."""
    if shift:
        # Shift the labels, not the logits: slicing the logits would copy a (batch, length, vocabulary) tensor.
        labels, _ = next_token_targets(labels)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def label_count(batch: dict, task: str) -> int:
    """How many labels a batch's loss covers (tokens, or examples for sequence classification)."""
    labels = batch["labels"]
    if task == "seq_cls":
        return int(labels.numel())
    if task == "causal_lm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def decoder_inputs(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder input: the labels shifted right behind the decoder start token."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


def model_inputs(batch: dict, task: str, config) -> dict:
    """The model's keyword arguments for a batch: decoder inputs for seq2seq, no cache anywhere, and for packed
    rows their restarting positions and no attention mask (which is what keeps their examples apart)."""
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:  # sentence pairs for BERT-style encoders
        inputs["token_type_ids"] = batch["token_type_ids"]
    if task == "seq2seq":
        start = config.decoder_start_token_id
        inputs["decoder_input_ids"] = decoder_inputs(batch["labels"], start, config.pad_token_id)
        inputs["use_cache"] = False
    elif task == "causal_lm":
        inputs["use_cache"] = False
    return inputs


def forward_logits(model, batch: dict, task: str, config) -> torch.Tensor:
    """Run the model on a batch the way its task needs; its logits."""
    return model(**model_inputs(batch, task, config)).logits


def batch_loss_sums(logits: torch.Tensor, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss sums and label counts for a task."""
    labels = batch["labels"]
    if task == "seq_cls":
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        return losses, torch.ones_like(labels)
    return token_loss_sums(logits, labels, shift=task == "causal_lm")


def correct_counts(logits: torch.Tensor, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example number of correct argmax predictions and of labels (classification tasks)."""
    labels = batch["labels"]
    predicted = logits.argmax(dim=-1)
    if task == "seq_cls":
        return (predicted == labels).long(), torch.ones_like(labels)
    valid = labels != IGNORE_INDEX
    return ((predicted == labels) & valid).sum(dim=1), valid.sum(dim=1)
