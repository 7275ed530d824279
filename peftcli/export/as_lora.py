"""`peft export --format lora`: any mergeable adapter as a plain LoRA adapter, by truncated SVD per layer.

Each adapted linear layer's update is taken as merged minus base, both in fp32, from the streaming merge
(`open_merge`), so every method's own `merge()` defines its update, DoRA's magnitude rescale and OFT's rotation
included; a linear weight a method trains in full (freeze, full) gives its update the same way. The update
dW (out x in) = U S V^T is cut to rank r and split evenly, B = U_r sqrt(S_r) and
A = sqrt(S_r) V_r^T, with alpha = r so that LoRA's scale alpha / r is 1. Small modules a method replaces
outright (normalisation weights under LN tuning, a task head) become `modules_to_save`, which HF PEFT reads as
whole-module copies. Biases of linear layers and other layer types have no LoRA form and are refused.

The adapter is written with our own LoRA implementation and `save_adapter`, so the files are the HF PEFT
format every other LoRA export uses. Before anything is published, two questions are checked on a few
fixed prompts (peftcli/export/lora_fidelity.py): is what was written what was meant (read back bit for bit,
and loaded by HF PEFT with the logits of the computed factors), and is the approximation as faithful as the
user asked (--max-effect-loss). Either failing is a VerificationError (exit 1) with nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import AdapterError, PeftCliError, VerificationError
from peftcli.export.lora_fidelity import check_fidelity, check_reload, effect_lost, max_abs_diff, probe
from peftcli.export.merge import build_skeleton, open_merge, wrapper_chain
from peftcli.train.run_dir import TOKENIZER_FILES, label_names
from peftcli.train.safe_write import staged_dir
from peftcli.tuners.adapter import (
    adapter_state_dict,
    adapter_task,
    apply_adapter,
    read_adapter_config,
    read_adapter_weights,
)
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

REPORT_NAME = "conversion.json"
DEFAULT_RANK = 16
DEFAULT_MAX_EFFECT_LOSS = 0.5


@dataclass(frozen=True)
class LayerFit:
    """How well the rank-r factors reproduce one layer's update."""

    module: str
    shape: tuple[int, int]
    rank: int
    relative_error: float  # ||dW - B A||_F / ||dW||_F (0 for a zero update)
    kept_energy: float  # sum of the kept S^2 over the sum of all S^2


@dataclass
class Conversion:
    """What `convert_to_lora` wrote, for the CLI to print."""

    output: Path
    method: str
    base: str
    layers: list[LayerFit]
    modules_to_save: list[str]
    probe_max_abs: float  # max |logit difference|, base + converted LoRA vs base + original adapter
    probe_relative: float  # the same over max |logit| of the original
    effect_lost: float  # ||LoRA - adapter|| / ||adapter - base|| over the probe logits (the gated share)
    max_effect_loss: float  # the bound it was held to
    reader: str  # what read the written adapter back for the logit check (HF PEFT, or peftcli without it)
    reload_max_abs: float  # max |logit difference|, written adapter as `reader` loads it vs the computed factors
    reload_tolerance: float  # what fp32 summation order explains
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({fit.rank for fit in self.layers})

    @property
    def median_error(self) -> float:
        return statistics.median(fit.relative_error for fit in self.layers) if self.layers else 0.0

    def worst(self, count: int = 3) -> list[LayerFit]:
        return sorted(self.layers, key=lambda fit: fit.relative_error, reverse=True)[:count]


def check_request(rank: int | None, energy: float | None, max_effect_loss: float = DEFAULT_MAX_EFFECT_LOSS) -> None:
    """Refuse impossible settings before anything is loaded."""
    if not max_effect_loss >= 0:  # NaN too
        raise PeftCliError(
            f"--max-effect-loss: {max_effect_loss} must be at least 0, the share of the adapter's effect the LoRA may "
            "lose (0.5: half)"
        )
    if rank is not None and energy is not None:
        raise PeftCliError("--rank and --energy exclude each other: give a fixed rank or an energy to keep")
    if rank is not None and rank < 1:
        raise PeftCliError(f"--rank: {rank} must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise PeftCliError(f"--energy: {energy} must be in (0, 1], the share of squared singular values to keep")


def check_method(method: str) -> None:
    """Only methods whose effect is a change of the base weights have a LoRA form."""
    spec = get_tuner(method)
    if spec.capabilities.kind == "edits_inputs" or not spec.capabilities.mergeable:
        reason = spec.merge_refusal or "it does not change the base weights"
        raise AdapterError(f"method {method} cannot be exported as LoRA: {reason}")


def _rank_for_energy(squares: torch.Tensor, energy: float) -> int:
    """The smallest rank whose squared singular values reach `energy` of the total (1 for a zero update)."""
    total = squares.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # A few fp32 ulps below the target: 0.99 must not take an extra rank because fp32 singular values put
    # the running share at 0.98999994.
    slack = 8 * torch.finfo(torch.float32).eps
    return min(int(torch.searchsorted(kept, energy - slack).item()) + 1, squares.numel())


def factorize(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """B (out x r) and A (r x in), fp32, with B A close to `delta`; also r and the share of energy kept.

    The SVD runs in fp32 (fp64 took twice as long): at full rank the factors reproduce the update to a few fp32
    ulps times sqrt(size), far below what an adapter stored in 16 bits carries anyway.
    """
    threads = torch.get_num_threads()
    # One thread: LAPACK gains little from threads on one layer's matrix, and on a busy machine its threads
    # waiting on each other made a 1536 x 576 SVD 35 times slower (35 s instead of 1 s).
    torch.set_num_threads(1)
    try:
        u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    squares = s.double().square()
    r = min(rank, s.numel()) if rank is not None else _rank_for_energy(squares, energy)
    root = s[:r].sqrt()
    total = squares.sum().item()
    kept = squares[:r].sum().item() / total if total > 0 else 1.0
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    if rank is not None and rank > r:  # zero-padded to the asked rank: one rank for all layers (vLLM needs that)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b, a, max(r, rank or 0), kept


def _relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    norm = torch.linalg.matrix_norm(delta).item()
    return torch.linalg.matrix_norm(delta - b @ a).item() / norm if norm > 0 else 0.0


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not getattr(module, "stored_transposed", False)


def _small_module(module: nn.Module) -> bool:
    """A module with only vector parameters (a norm): copying it whole as modules_to_save costs little."""
    return all(param.dim() <= 1 for param in module.parameters(recurse=False))


def _collect(source, fresh: nn.Module, head_modules: set[str], rank, energy):
    """The LoRA factors of every adapted linear layer, and whole-module copies of what a method replaced."""
    plan = source.plan
    if plan.untied:
        raise AdapterError(
            f"the adapter changes one side of the tied weights {' / '.join(plan.untied)}; a LoRA adapter cannot "
            "express that (export --format safetensors instead)"
        )
    if plan.expert_rows:
        raise AdapterError("adapted fused expert weights have no LoRA export yet; use --format safetensors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fits: list[LayerFit] = []
    copies: dict[str, dict[str, torch.Tensor]] = {}

    def _fit(owner: str, delta: torch.Tensor) -> None:
        b, a, r, kept = factorize(delta, rank, energy)
        factors[owner] = (b, a)
        fits.append(LayerFit(owner, tuple(delta.shape), r, _relative_error(delta, b, a), kept))

    for owner, layer in plan.wrapped.items():
        _, base_module = wrapper_chain(layer)
        merged = {key: source.read(key) for key in plan.parts_of[owner]}
        base = {key: source.base(key).to(torch.float32) for key in merged}
        if _is_linear(base_module):
            bias = f"{owner}.bias"
            if bias in merged and not torch.equal(merged[bias].to(torch.float32), base[bias]):
                raise AdapterError(
                    f"{owner}: the method changes this layer's bias, which LoRA cannot express; export --format "
                    "safetensors (a merged model) instead"
                )
            _fit(owner, merged[f"{owner}.weight"].to(torch.float32) - base[f"{owner}.weight"])
        elif _small_module(base_module):
            copies[owner] = {key.rsplit(".", 1)[1]: value for key, value in merged.items()}
        else:
            raise AdapterError(
                f"{owner} is a {type(base_module).__name__}; only linear layers convert to LoRA here (and small "
                "norm-like modules as modules_to_save); export --format safetensors instead"
            )
    for key, value in plan.replaced.items():
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        module = fresh.get_submodule(owner)
        trained_weight = leaf == "weight" and key not in plan.new_keys and owner not in head_modules
        if trained_weight and _is_linear(module) and f"{owner}.bias" not in plan.replaced:
            # A linear weight trained in full (freeze, full): its update is a weight delta like any other
            _fit(owner, value.to(torch.float32) - source.base(key).to(torch.float32))
            continue
        if not (_small_module(module) or owner in head_modules):
            raise AdapterError(
                f"the method trains {key} on its own; LoRA has no form for that, and keeping it "
                f"would copy the whole {type(module).__name__} {owner} (modules_to_save); export --format "
                "safetensors (a merged model) instead"
            )
        copies.setdefault(owner, {})[leaf] = value
    for owner, tensors in copies.items():  # parameters the method left alone come from the base
        for leaf, _ in fresh.get_submodule(owner).named_parameters(recurse=False):
            if leaf not in tensors:
                tensors[leaf] = source.base(f"{owner}.{leaf}")
    return factors, fits, copies


def _lora_params(fits: list[LayerFit], copies: dict):
    """LoRA params with alpha = r everywhere; ranks that differ from the most common one go in rank_pattern."""
    from peftcli.tuners.lora.spec import LoraParams

    counts = Counter(fit.rank for fit in fits)
    common = max(counts, key=lambda r: (counts[r], r)) if counts else 1
    # Anchored and escaped, so each key selects exactly its module in HF PEFT and in our loader.
    pattern = {f"^{re.escape(fit.module)}": fit.rank for fit in fits if fit.rank != common}
    return LoraParams(
        r=common,
        alpha=common,
        target_modules=sorted(fit.module for fit in fits),
        rank_pattern=pattern,
        alpha_pattern={key: float(r) for key, r in pattern.items()},
        modules_to_save=sorted(copies),
    )


def _fill(model: nn.Module, factors: dict, copies: dict) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for owner, (b, a) in factors.items():
            named[f"{owner}.lora_A.weight"].data = a.clone()
            named[f"{owner}.lora_B.weight"].data = b.clone()
        for owner, tensors in copies.items():
            for leaf, value in tensors.items():
                named[f"{owner}.{leaf}"].data = value.to(torch.float32, copy=True)


def _check_written(tmp: Path, expected: dict[str, torch.Tensor]) -> None:
    """The written file must hold exactly the computed tensors (all fp32, so exactly)."""
    written = read_adapter_weights(tmp)
    if set(written) != set(expected):
        raise VerificationError(f"the written adapter has other tensors than computed ({len(written)} keys)")
    for key, value in expected.items():
        if written[key].dtype != value.dtype or not torch.equal(written[key], value):
            raise VerificationError(f"the written adapter's {key} differs from the computed one")


def _tokenizer_dir(adapter_dir: Path, section) -> Path:
    return adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(section.name_or_path)


def convert_to_lora(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_effect_loss: float = DEFAULT_MAX_EFFECT_LOSS,
    base: str | None = None,
    overwrite: bool = False,
) -> Conversion:
    """Write the adapter in `adapter_dir` as a plain LoRA adapter (HF PEFT format) at `output`, or raise
    VerificationError (nothing written) when the written files do not load as computed or the LoRA loses more
    than `max_effect_loss` of the adapter's effect on the probe."""
    started = time.perf_counter()
    adapter_dir, output = Path(adapter_dir), Path(output)
    if rank is None and energy is None:
        rank = DEFAULT_RANK
    check_request(rank, energy, max_effect_loss)
    method, _, raw = read_adapter_config(adapter_dir)
    check_method(method)
    task = adapter_task(raw)
    source = open_merge(adapter_dir, base, "fp32")
    labels = label_names(adapter_dir)
    try:
        fresh = build_skeleton(source.section, labels)
        factors, fits, copies = _collect(source, fresh, set(raw.get("modules_to_save") or []), rank, energy)
    finally:
        source.close()
    if not factors:
        raise AdapterError(
            f"method {method} changes no linear layer here (only {len(copies)} whole module(s), e.g. norms): a LoRA "
            "adapter would hold nothing but modules_to_save copies; export --format peft or safetensors instead"
        )
    params = _lora_params(fits, copies)
    apply_adapter(fresh, params, AdapterContext(task=task))
    _fill(fresh, factors, copies)
    expected = adapter_state_dict(fresh)
    notes = list(source.notes)
    if len({fit.rank for fit in fits}) > 1:
        notes.append(
            "layers got different ranks (rank_pattern/alpha_pattern in adapter_config.json): HF PEFT reads them, "
            "vLLM needs one rank for all layers: export with --rank R for vLLM"
        )
    if copies:
        notes.append(
            f"{len(copies)} module(s) the method replaces outright are kept whole as modules_to_save: "
            f"{', '.join(sorted(copies)[:4])}{' ...' if len(copies) > 4 else ''}"
        )
    if method == "lora" and raw.get("use_dora"):
        notes.append("DoRA: each layer's full update (merged - base, magnitude rescale included) was factorized")
    tokenizers = _tokenizer_dir(adapter_dir, source.section)
    with staged_dir(output, overwrite) as tmp:
        from peftcli.tuners.adapter import save_adapter

        save_adapter(fresh, tmp, base_model_name_or_path=source.section.name_or_path)
        for name in TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, tmp / name)
        _check_written(tmp, expected)
        logits = probe(source.section, labels, adapter_dir, tmp, tokenizers, task, params,
                       lambda model: _fill(model, factors, copies))  # fmt: skip
        reload_max_abs, tolerance = check_reload(logits)
        lost = effect_lost(logits)
        check_fidelity(lost, max_effect_loss, rank, energy)
        max_abs = max_abs_diff(logits.written, logits.original)
        scale = max(x.abs().max().item() for x in logits.original)
        result = Conversion(
            output=output,
            method=method,
            base=source.section.name_or_path,
            layers=fits,
            modules_to_save=sorted(copies),
            probe_max_abs=max_abs,
            probe_relative=max_abs / scale if scale > 0 else 0.0,
            effect_lost=lost,
            max_effect_loss=max_effect_loss,
            reader=logits.reader,
            reload_max_abs=reload_max_abs,
            reload_tolerance=tolerance,
            seconds=time.perf_counter() - started,
            notes=notes,
        )
        (tmp / REPORT_NAME).write_text(json.dumps(_report(result, rank, energy), indent=2) + "\n", encoding="utf-8")
    return result


def _report(result: Conversion, rank: int | None, energy: float | None) -> dict:
    """conversion.json: the settings, the probe and every layer's fit."""
    return {
        "source_method": result.method,
        "base_model": result.base,
        "rank": rank,
        "energy": energy,
        "ranks": result.ranks,
        "median_relative_error": result.median_error,
        "worst_relative_error": max((fit.relative_error for fit in result.layers), default=0.0),
        "probe": {
            "max_abs_logit_diff": result.probe_max_abs,
            "relative": result.probe_relative,
            "effect_lost": result.effect_lost,
            "max_effect_loss": result.max_effect_loss,
        },
        "read_back": {
            "reader": result.reader,
            "max_abs_logit_diff": result.reload_max_abs,
            "tolerance": result.reload_tolerance,
        },
        "modules_to_save": result.modules_to_save,
        "notes": result.notes,
        "layers": [asdict(fit) for fit in result.layers],
    }
