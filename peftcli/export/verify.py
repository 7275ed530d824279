"""`--verify`: the merged model against base + adapter, logits on a few prompts, with a bound from the dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: what is 12 times 7? Answer:",
)
# fp32 noise: the merged and the unmerged model add the same numbers in another order.
RELATIVE_NOISE = 1e-4


@dataclass(frozen=True)
class Verification:
    """How far the merged model's logits are from base + adapter, and how far rounding explains."""

    difference: float
    tolerance: float
    rounding: float  # what a rounding-sized error on every base weight moves the logits by

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance


def _inputs(tokenizer, task: str) -> list[dict]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids}
        if task == "seq2seq":
            inputs["decoder_input_ids"] = ids[:, :4]
        out.append(inputs)
    return out


@torch.no_grad()
def _logits(model, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**inputs).logits for inputs in batches]


def _rounding_error(weight: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """`weight` with a uniform error of up to half an ulp of `dtype` on every element, as rounding leaves."""
    info = torch.finfo(dtype)
    ulp = torch.exp2(torch.floor(torch.log2(weight.abs().clamp_min(info.tiny)))) * info.eps
    return weight + (torch.rand(weight.shape, generator=generator) - 0.5) * ulp


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def verify_merged(adapter_dir: str | Path, merged_dir: str | Path, dtype: torch.dtype, base: str | None = None):
    """Compare base + adapter (fp32) with the merged model (its `dtype` weights read as fp32).

    The bound: a merged model stored in `dtype` carries one rounding of each merged weight. Giving every base
    weight of the reference a random error of up to half a `dtype` ulp measures what such rounding costs on
    these prompts (rounding the base itself would measure nothing when it is stored in `dtype` already); a
    right merge stays within twice that, plus fp32 summation noise. A wrong merge (a tied head changed with
    the embedding, a layer merged twice) moves logits by the adapter's effect, far beyond.
    """
    from transformers import AutoTokenizer

    from peftcli.models.load import auto_class, load_base_model
    from peftcli.train.run_dir import label_names, model_section
    from peftcli.tuners.adapter import adapter_info, adapter_task, load_adapter, read_adapter_config

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    _, _, raw = read_adapter_config(adapter_dir)
    section = model_section(adapter_dir, base).model_copy(update={"dtype": "fp32", "task": adapter_task(raw)})
    batches = _inputs(AutoTokenizer.from_pretrained(merged_dir), section.task)
    reference = load_base_model(section, label_names=label_names(adapter_dir)).eval()
    load_adapter(reference, adapter_dir)
    expected = _logits(reference, batches)
    adapter_params = set(adapter_info(reference).param_names)
    generator = torch.Generator().manual_seed(0)
    for name, param in reference.named_parameters():
        if name not in adapter_params and param.is_floating_point():
            param.data = _rounding_error(param.data, dtype, generator)
    rounding = _worst(_logits(reference, batches), expected)
    del reference
    merged = auto_class(section.task).from_pretrained(merged_dir, dtype=torch.float32).eval()
    difference = _worst(_logits(merged, batches), expected)
    scale = max(max(x.abs().max().item() for x in expected), 1.0)
    return Verification(difference, 2 * rounding + RELATIVE_NOISE * scale, rounding)
