"""Batches: pad to the longest example, labels padded with -100 (by length, never by token id).

The batch contract, per task (what `prepare_data` produces and the training loop relies on):

- every task: `input_ids` (batch, length) right-padded with the pad token, `attention_mask` (batch, length)
  1 on real tokens and 0 on padding; `token_type_ids` (batch, length), padded with 0, when the tokenizer
  makes them (BERT-style: 0 for the first text, 1 for `text_pair`). All LongTensors.
- causal_lm: `labels` (batch, length), the input ids themselves where the loss is taken and -100 elsewhere
  (the prompt when mask_prompt is on, and padding). Not shifted: the loop predicts token t+1 from t.
- seq2seq: `input_ids` is the encoder input (the prompt); `labels` (batch, target length) are the decoder
  targets, the completion's tokens ending in eos, -100 on padding. Not shifted: the loop builds
  decoder_input_ids by shifting them right behind the decoder start token.
- seq_cls: `labels` (batch,), one class id per example.
- token_cls: `labels` (batch, length), aligned with input_ids: the class id on the first sub-token of each
  word, -100 on the other sub-tokens, on special tokens and on padding.

Packed rows (causal_lm with data.packing, see data/packing.py) also carry `position_ids` (batch, length),
restarting at 0 for each example; the padding after a row counts as one more sequence of its own
(0, 1, 2, ...) so it never joins the last example. Their `attention_mask` still marks real tokens, for
counting, but the model is run without it: the restarting positions are what keep examples apart.

Preference batches hold two rows per example, the first rows then the second ones (PairCollator: chosen then
rejected; UnpairedCollator: the example's own row then its mismatched row, plus `desirable`).

The task is read from the examples themselves: an int label is seq_cls; label lists are padded to their own
longest length, which equals the input length for causal_lm and token_cls.
"""

from __future__ import annotations

import torch

from peftcli.data.formats import IGNORE_INDEX


class PadCollator:
    """Right-pads input_ids, attention_mask, token_type_ids and labels of a list of examples."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, sequences: list[list[int]]) -> int:
        """The longest length, rounded up to pad_to_multiple_of."""
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        """A (batch, padded length) LongTensor of right-padded sequences."""
        out = torch.full((len(sequences), self.padded_length(sequences)), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return out

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": self.pad(ids, self.pad_token_id),
            "attention_mask": self.pad([[1] * len(s) for s in ids], 0),
        }
        if "position_ids" in examples[0]:
            width = self.padded_length(ids)
            batch["position_ids"] = torch.tensor(
                [[*e["position_ids"], *range(width - len(e["position_ids"]))] for e in examples], dtype=torch.long
            )
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self.pad([e["token_type_ids"] for e in examples], 0)
        labels = [e["labels"] for e in examples]
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["labels"] = self.pad(labels, IGNORE_INDEX)
        return batch


class PairCollator:
    """Preference pairs (data/formats.py: render_preference) as one padded batch: every pair's chosen row, then
    every pair's rejected row, in the same order (train/preference.py splits the batch in halves)."""

    def __init__(self, pad_token_id: int):
        self.rows = PadCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        chosen = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        rejected = [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
        return with_rows(self.rows([*chosen, *rejected]), examples)


class UnpairedCollator:
    """Unpaired examples (data/formats.py: render_unpaired) as one padded batch: every example's own row, then
    every example's mismatched row, in the same order, plus `desirable` (examples,), a bool tensor of their
    labels (train/unpaired.py splits the batch in halves)."""

    def __init__(self, pad_token_id: int):
        self.rows = PadCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        matched = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        mismatched = [{"input_ids": e["mismatched_input_ids"], "labels": e["mismatched_labels"]} for e in examples]
        batch = self.rows([*matched, *mismatched])
        batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples], dtype=torch.bool)
        return with_rows(batch, examples)


def with_rows(batch: dict, examples: list[dict]) -> dict:
    """`row` (examples,), where the examples carry one: their place in the precomputed reference table."""
    if "row" in examples[0]:
        batch["row"] = torch.tensor([e["row"] for e in examples], dtype=torch.long)
    return batch
