"""The checks of `peft export --format lora` before it publishes: one about the files, one about the maths.

Both look at logits (fp32) on the fixed prompts of `peft merge --verify`, and either failing is a
VerificationError (exit 1) with nothing written.

- What was written is what was meant. Base + the written adapter as HF PEFT loads it (peftcli's loader when
  HF PEFT is not installed) must give the logits of base + the computed factors held in memory. The factors
  are written in fp32 and both sides are fp32 forwards through the same weights, so they may differ only by
  summation order: `verify.RELATIVE_NOISE` of the largest logit (1e-4, about 840 fp32 ulps), the bound the
  merge check uses for the same effect; on the tiny test model they agree to the bit. A misread config
  (alpha, a rank pattern, a missing module) moves them by a share of the adapter's effect instead. (The files
  are also read back bit for bit, in as_lora.py.)
- The approximation is as faithful as the user asked. Truncation loses part of what the adapter does; the
  share lost, ||(base + LoRA) - (base + adapter)|| / ||(base + adapter) - base|| over all probe logits
  (0: exact; 1: as if there were no adapter), must stay within --max-effect-loss (default 0.5: the LoRA keeps
  at least half of the adapter's effect). A share compares across models and adapters where a raw logit
  difference does not: the same 0.1 is noise for an adapter that moves logits by 5, and all of it for one
  that moves them by 0.1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import VerificationError
from peftcli.tuners.adapter import apply_adapter
from peftcli.tuners.protocol import AdapterContext


@dataclass
class Probe:
    """Logits (fp32) on the fixed prompts of `peft merge --verify`, one tensor per prompt, for each model compared."""

    base: list[torch.Tensor]
    original: list[torch.Tensor]  # base + the adapter being converted
    meant: list[torch.Tensor]  # base + the computed factors, in memory
    written: list[torch.Tensor]  # base + the written adapter, as `reader` loads it
    reader: str


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |difference| between two lists of logits."""
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _norm(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum((x.double() - y.double()).square().sum().item() for x, y in zip(a, b, strict=True)))


def _read_back(section, labels, adapter_dir: Path) -> tuple[str, nn.Module]:
    """Base + the adapter in `adapter_dir` as HF PEFT loads it; peftcli's loader when HF PEFT is not installed.

    HF PEFT is the reader the users of a plain LoRA have (vLLM and llama.cpp's converter follow its format), so
    it is the one that must agree; it stays optional at run time, as everywhere else in peftcli.
    """
    from peftcli.models.load import load_base_model
    from peftcli.tuners.adapter import load_adapter

    model = load_base_model(section, label_names=labels).eval()
    try:
        import peft
    except ImportError:
        load_adapter(model, adapter_dir)
        return "peftcli's loader (HF PEFT is not installed)", model
    with warnings.catch_warnings():  # HF PEFT's notes on the config; the logits decide
        warnings.simplefilter("ignore")
        return f"HF PEFT {peft.__version__}", peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()


@torch.no_grad()
def probe(section, labels, adapter_dir: Path, written_dir: Path, tokenizer_dir: Path, task: str, params, fill) -> Probe:
    """The logits of base, base + the original adapter, base + the computed factors (`params` applied, then
    `fill`ed: what was meant) and base + the written adapter as HF PEFT reads it (what was written), all fp32."""
    from transformers import AutoTokenizer

    from peftcli.export.verify import _inputs
    from peftcli.models.load import load_base_model
    from peftcli.tuners.adapter import load_adapter

    section = section.model_copy(update={"dtype": "fp32"})
    batches = _inputs(AutoTokenizer.from_pretrained(tokenizer_dir), section.task)

    def run(model: nn.Module) -> list[torch.Tensor]:
        return [model(**inputs).logits for inputs in batches]

    model = load_base_model(section, label_names=labels).eval()
    base = run(model)
    apply_adapter(model, params, AdapterContext(task=task))
    fill(model)
    meant = run(model)
    model = load_base_model(section, label_names=labels).eval()
    load_adapter(model, adapter_dir)
    original = run(model)
    reader, model = _read_back(section, labels, written_dir)
    return Probe(base, original, meant, run(model), reader)


def reload_tolerance(logits: list[torch.Tensor]) -> float:
    """What summation order may change between two fp32 forwards through the same weights (module docstring)."""
    from peftcli.export.verify import RELATIVE_NOISE

    return RELATIVE_NOISE * max(max(x.abs().max().item() for x in logits), 1.0)


def check_reload(result: Probe) -> tuple[float, float]:
    """The written adapter, as its reader loads it, against the computed factors; (difference, tolerance)."""
    difference, tolerance = max_abs_diff(result.written, result.meant), reload_tolerance(result.meant)
    if not difference <= tolerance:
        raise VerificationError(
            f"{result.reader} reads the written adapter differently from what was computed: probe logits differ by "
            f"{difference:.3g}, more than the {tolerance:.3g} that fp32 summation order explains; nothing was "
            "written. Please report this with the adapter's adapter_config.json (export --format safetensors "
            "works meanwhile)"
        )
    return difference, tolerance


def effect_lost(result: Probe) -> float:
    """||LoRA - adapter|| / ||adapter - base|| over all probe logits; 0 (inf) when the adapter leaves the probe
    unchanged within rounding and the LoRA does (does not)."""
    floor = reload_tolerance(result.original)
    if max_abs_diff(result.original, result.base) <= floor:
        return 0.0 if max_abs_diff(result.written, result.original) <= floor else math.inf
    return _norm(result.written, result.original) / _norm(result.original, result.base)


def check_fidelity(lost: float, bound: float, rank: int | None, energy: float | None) -> None:
    """Fail when the LoRA keeps less of the adapter's effect than asked, saying what to change."""
    if lost <= bound:
        return
    more = f"raise --rank (now {rank}) or use --energy 0.99" if rank is not None else f"raise --energy (now {energy:g})"
    if math.isinf(lost):
        raise VerificationError(
            "the original adapter leaves the probe logits unchanged but the converted LoRA moves them; nothing was "
            "written. Please report this"
        )
    accept = math.ceil(lost * 100) / 100
    raise VerificationError(
        f"the converted LoRA loses {lost:.0%} of the adapter's effect on the probe logits "
        f"(||LoRA - adapter|| / ||adapter - base||), more than --max-effect-loss {bound:g}; nothing was written. "
        f"To keep more, {more}; to accept the loss, pass --max-effect-loss {accept:g}"
    )
