"""sft: cross-entropy on the completion (or every) token, the default."""

from __future__ import annotations

from typing import Literal

from peftcli.objectives.registry import ObjectiveCapabilities, ObjectiveOptions, ObjectiveSpec, register


class SftOptions(ObjectiveOptions):
    name: Literal["sft"] = "sft"


SPEC = register(
    ObjectiveSpec(
        name="sft",
        summary="supervised fine-tuning: next-token (or label) cross-entropy, as the task defines it",
        options=SftOptions,
        capabilities=ObjectiveCapabilities(reference=False, tasks=("causal_lm", "seq2seq", "seq_cls", "token_cls")),
    )
)
