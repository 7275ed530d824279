"""Validation loss (with perplexity or accuracy), and a generation score (share of greedy answers matching a regex)."""

from __future__ import annotations

import math
import re

import torch

from peftcli.data.formats import IGNORE_INDEX
from peftcli.train.losses import GENERATIVE_TASKS, batch_loss_sums, correct_counts, forward_logits
from peftcli.train.objective import TaskObjective
from peftcli.train.preference import RewardObjective


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator, objective: TaskObjective) -> dict:
    """Label-weighted mean loss over the whole validation set (gathered across processes), plus perplexity for
    generative tasks and accuracy for classification."""
    if isinstance(objective, RewardObjective):
        return _evaluate_preference(model, dataloader, accelerator, objective)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss, labels, correct, predicted labels
    task = objective.task
    for batch in dataloader:
        if task in GENERATIVE_TASKS:
            sums, counts = objective.loss_sums(model, batch)
            parts = [sums.double(), counts.double()]
        else:
            logits = forward_logits(model, batch, task, objective.config)
            sums, counts = batch_loss_sums(logits, batch, task)
            correct, labelled = correct_counts(logits, batch, task)
            parts = [sums.double(), counts.double(), correct.double(), labelled.double()]
        gathered = accelerator.gather_for_metrics(tuple(parts))
        for index, part in enumerate(gathered):
            totals[index] += part.sum().cpu()
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    result = {"eval_loss": loss}
    if task in GENERATIVE_TASKS:
        result["eval_ppl"] = math.exp(min(loss, 50.0))
        result["eval_tokens"] = int(totals[1].item())
    else:
        result["eval_accuracy"] = (totals[2] / totals[3].clamp(min=1)).item()
        result["eval_labels"] = int(totals[3].item())
    return result


def _evaluate_preference(model, dataloader, accelerator, objective: RewardObjective) -> dict:
    """Mean loss over the validation examples (pairs, or unpaired examples), with the objective's metrics over
    them: pairs report mean rewards, margin, reward accuracy (the share of pairs the model ranks right) and
    log-probabilities; kto reports its own (train/unpaired.py)."""
    was_training = model.training
    model.eval()
    totals = None
    examples = 0
    for batch in dataloader:
        losses, values = objective.terms(model, batch)
        rows = accelerator.gather_for_metrics(torch.cat([losses.detach().double()[:, None], values], dim=1))
        totals = rows.sum(dim=0).cpu() if totals is None else totals + rows.sum(dim=0).cpu()
        examples += rows.shape[0]
    model.train(was_training)
    if totals is None:  # prepare_data never leaves a validation set empty
        return {"eval_loss": float("nan"), f"eval_{objective.unit}": 0}
    result = {"eval_loss": float(totals[0]) / max(1, examples), f"eval_{objective.unit}": examples}
    result.update({f"eval_{name}": value for name, value in objective.metric_means(totals[1:]).items()})
    return result


def majority_class_rate(dataset, task: str) -> float | None:
    """Accuracy of always predicting the most frequent label of `dataset` (the bar a classifier must clear)."""
    if task not in ("seq_cls", "token_cls") or dataset is None or len(dataset) == 0:
        return None
    counts: dict[int, int] = {}
    for labels in dataset["labels"]:
        for label in labels if isinstance(labels, list) else [labels]:
            if label != IGNORE_INDEX:
                counts[label] = counts.get(label, 0) + 1
    return max(counts.values()) / sum(counts.values()) if counts else None


def prompt_ids(example: dict) -> list[int]:
    """The tokens before the first label: the prompt the model must answer."""
    labels = example["labels"]
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:first])


@torch.no_grad()
def generation_score(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    pattern: str,
    batch_size: int = 8,
    on_batch=None,
):
    """Greedy answers to `prompts`, and the share of them in which `pattern` is found.

    Decoder-only models continue the left-padded prompts; encoder-decoder models read them with the encoder
    and answer from the decoder start token. Prompt methods (virtual tokens, prefixes) work through
    `model.generate` too: their forward hooks add the prompt whenever the cache is empty. `on_batch(done, total)`
    is called after each batch of prompts (scoring takes minutes on a CPU; the caller shows it moving).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    regex = re.compile(pattern)
    answers: list[str] = []
    pad = tokenizer.pad_token_id
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
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
        # An encoder-decoder's output is the decoder's sequence: its start token, then the answer.
        for row in output[:, 1:] if encoder_decoder else output[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(len(answers), len(prompts))
    model.train(was_training)
    hits = sum(1 for a in answers if regex.search(a))
    return {"gen_score": hits / max(1, len(answers)), "gen_matches": hits, "gen_prompts": len(answers)}, answers
