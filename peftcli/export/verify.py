"""`--verify`: the merged model against base + adapter, logits on a few prompts."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: what is 12 times 7? Answer:",
)


def logits_difference(adapter_dir: str | Path, merged_dir: str | Path, base: str | None = None) -> float:
    """Max |logit difference| between base + adapter and the merged model, both in fp32, on PROMPTS."""
    from transformers import AutoTokenizer

    from peftcli.export.merge import _label_names, run_model_section
    from peftcli.models.load import auto_class, load_base_model
    from peftcli.tuners.adapter import adapter_task, load_adapter, read_adapter_config

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    _, _, raw = read_adapter_config(adapter_dir)
    section = run_model_section(adapter_dir, base).model_copy(update={"dtype": "fp32", "task": adapter_task(raw)})
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reference = load_base_model(section, label_names=_label_names(adapter_dir)).eval()
    load_adapter(reference, adapter_dir)
    merged = auto_class(section.task).from_pretrained(merged_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids}
        if section.task == "seq2seq":
            inputs["decoder_input_ids"] = ids[:, :4]
        with torch.no_grad():
            expected = reference(**inputs).logits
            got = merged(**inputs).logits
        worst = max(worst, (expected - got).abs().max().item())
    return worst
