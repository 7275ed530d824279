"""Validation loss and perplexity, and a generation score (share of greedy answers matching a regex)."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from peftcli.data.formats import IGNORE_INDEX


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of next-token cross-entropy and the number of label tokens it covers."""
    # Shift the labels, not the logits: slicing the logits would copy a (batch, length, vocabulary) tensor.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return losses.sum(dim=1), counts


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator) -> dict:
    """Token-weighted mean loss over the whole validation set, gathered across processes."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    total_tokens = torch.zeros((), dtype=torch.float64)
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        sums, counts = token_loss_sums(logits, batch["labels"])
        sums, counts = accelerator.gather_for_metrics((sums, counts))
        total_loss += sums.double().sum().cpu()
        total_tokens += counts.double().sum().cpu()
    model.train(was_training)
    loss = (total_loss / total_tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(total_tokens.item())}


def prompt_ids(example: dict) -> list[int]:
    """The tokens before the first label: the prompt the model must answer."""
    labels = example["labels"]
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:first])


@torch.no_grad()
def generation_score(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, pattern: str, batch_size: int = 8
):
    """Greedy answers to `prompts`, and the share of them in which `pattern` is found."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    regex = re.compile(pattern)
    answers: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):  # left padding, so every answer starts at the same column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in output[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    hits = sum(1 for a in answers if regex.search(a))
    return {"gen_score": hits / max(1, len(answers)), "gen_matches": hits, "gen_prompts": len(answers)}, answers
