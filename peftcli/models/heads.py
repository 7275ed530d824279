"""Which modules of a transformers model are its heads: the output (LM) head and a task head.

Model knowledge that quantization (keep heads in floating point), the methods (never wrap a head) and the
merge all need.
"""

from __future__ import annotations

from torch import nn

TASK_HEAD_NAMES = ("score", "classifier")
_HEADED_CLASSES = ("ForSequenceClassification", "ForTokenClassification")


def task_head_names(model: nn.Module) -> list[str]:
    """The freshly initialised classification head of a seq/token classification model (`score`, `classifier`).

    It is trained in full and saved with every adapter, as HF PEFT's SEQ_CLS/TOKEN_CLS tasks do, and no
    method wraps it.
    """
    if not type(model).__name__.endswith(_HEADED_CLASSES):
        return []
    return [name for name, _ in model.named_children() if name in TASK_HEAD_NAMES]


def output_head_names(model: nn.Module) -> list[str]:
    """Names of the output head (the LM head) and any task head, which `all-linear` leaves out."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.append(name)
    return heads + task_head_names(model)
