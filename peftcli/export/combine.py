"""`peft merge A B ... --combine RULE`: several LoRA adapters of one base combined into one LoRA adapter.

The rules are HF PEFT's `add_weighted_adapter` rules, computed the same way so that a combination made here
equals the one HF PEFT makes from the same adapters:

- linear, ties, dare_linear, dare_ties, magnitude_prune work on A and B separately (all ranks equal); each
  adapter's weight times its scale is split as sqrt(|w·s|) onto A (with the sign) and onto B.
- cat stacks the ranks: A's rows (times w·s) and B's columns, zero-padded to the sum of the ranks.
- svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd combine the full updates w·s·B·A and
  keep the top `rank` singular directions.

The new adapter has alpha = r (scale 1): the sources' scales are already inside its tensors. It is written with
use_rslora false; HF PEFT keeps the first source's use_rslora, which scales an rsLoRA combination by sqrt(r)
once more. A module only some sources adapt gets only their contribution (the rules treat a missing update as
zero, as HF PEFT does).

DARE's random masks come from a generator seeded by --seed alone, drawn in the base model's module order (per
module: A's masks, then B's, one per source; for the _svd rules one per source's update), so a seed always
gives the same combination. HF PEFT draws the same masks in the same order but from torch's global generator,
after initialising the new adapter from it, so its masks depend on that initialisation; the tests compare the
two with shared masks.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import peftcli
from peftcli.errors import AdapterError, PeftCliError
from peftcli.train.run_dir import RECIPE_FILE, TOKENIZER_FILES, model_section, read_recipe
from peftcli.train.safe_write import staged_dir
from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, adapter_task, read_adapter_config, read_adapter_weights
from peftcli.tuners.hf_format import HF_KEY_PREFIX
from peftcli.tuners.lora.patterns import pattern_value

SAME_RANK_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_RULES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
RULES = (*SAME_RANK_RULES, "cat", *SVD_RULES)
PRUNING_RULES = tuple(r for r in RULES if r not in ("linear", "cat", "svd"))  # these need a density
SIGN_RULES = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")  # these elect a sign per entry
RANDOM_RULES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
RECORD_FILE = "combination.json"

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.weight)?$")


@dataclass
class LoraSource:
    """One LoRA adapter read from disk: its update per module as (A, B, scale)."""

    path: Path
    raw: dict
    base: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    embeddings: set[str] = field(default_factory=set)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


@dataclass
class Combination:
    """The combined adapter: (A, B) per module at one rank, and what the CLI reports."""

    rule: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    embeddings: set[str]
    notes: list[str] = field(default_factory=list)


def read_lora_source(path: str | Path, base: str | None = None) -> LoraSource:
    """A LoRA adapter's updates, refusing what these rules cannot combine (DoRA, biases, full tensors)."""
    path = Path(path)
    method, params, raw = read_adapter_config(path)
    if method != "lora":
        raise AdapterError(f"{path}: method {method} cannot be combined; --combine takes LoRA adapters only")
    if params.dora:
        raise AdapterError(
            f"{path}: a DoRA adapter cannot be combined: its magnitude vector rescales the whole weight, which no "
            "sum of low-rank updates reproduces"
        )
    if raw.get("lora_bias"):
        raise AdapterError(f"{path}: an adapter with lora_bias cannot be combined (the rules combine A and B only)")
    tensors = read_adapter_weights(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings = set()
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(HF_KEY_PREFIX))
        if match is None or not key.startswith(HF_KEY_PREFIX) or tensor.dim() != 2:
            raise AdapterError(
                f"{path}: {key} is not a LoRA A or B matrix of a linear or embedding layer (a module trained in "
                "full, a target parameter or a convolution); such adapters cannot be combined"
            )
        module = match["module"]
        pairs.setdefault(module, {})[match["side"]] = tensor
        if match["embedding"]:
            embeddings.add(module)
    modules = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(pair)} without its partner")
        rank = pair["A"].shape[0]
        alpha = pattern_value(params.alpha_pattern, module, params.alpha)
        scale = alpha / math.sqrt(rank) if params.rslora else alpha / rank
        modules[module] = (pair["A"], pair["B"], scale)
    if not modules:
        raise AdapterError(f"{path}: the adapter has no LoRA matrices")
    section = model_section(path, base)
    return LoraSource(path, raw, section.name_or_path, modules, embeddings)


def _same_base(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_request(
    sources: list[LoraSource],
    weights: list[float],
    rule: str,
    density: float | None,
    majority_sign: str | None,
    rank: int | None,
    seed: int | None,
) -> None:
    """Refuse, before any work, a combination that cannot be made or would silently ignore an option."""
    if rule not in RULES:
        raise PeftCliError(f"--combine: {rule!r} is not a rule; choose one of {', '.join(RULES)}")
    if len(weights) != len(sources):
        raise PeftCliError(f"--weights: {len(weights)} weights for {len(sources)} adapters; give one per adapter")
    if any(not math.isfinite(w) for w in weights):
        raise PeftCliError("--weights: every weight must be a finite number")
    if rule in PRUNING_RULES:
        if density is None:
            raise PeftCliError(f"--combine {rule} needs --density D: the fraction of each update's entries kept")
        if not 0 < density <= 1:
            raise PeftCliError(f"--density: {density} is outside (0, 1]; it is the fraction of entries kept")
    elif density is not None:
        raise PeftCliError(f"--density goes with the pruning rules ({', '.join(PRUNING_RULES)}), not {rule}")
    if majority_sign is not None:
        if rule not in SIGN_RULES:
            raise PeftCliError(f"--majority-sign goes with {', '.join(SIGN_RULES)}, not {rule}")
        if majority_sign not in ("total", "frequency"):
            raise PeftCliError(f"--majority-sign: {majority_sign!r} is not total or frequency")
    if rank is not None:
        if rule not in SVD_RULES:
            raise PeftCliError(f"--rank goes with the SVD rules ({', '.join(SVD_RULES)}), not {rule}")
        if rank < 1:
            raise PeftCliError(f"--rank: {rank} must be at least 1")
    if seed is not None and rule not in RANDOM_RULES:
        raise PeftCliError(f"--seed goes with the random rules ({', '.join(RANDOM_RULES)}), not {rule}")
    first = sources[0]
    for other in sources[1:]:
        if not _same_base(first.base, other.base):
            raise PeftCliError(
                f"{other.path} was trained on {other.base}, {first.path} on {first.base}; only adapters of the same "
                "base model can be combined"
            )
        if adapter_task(other.raw) != adapter_task(first.raw):
            raise PeftCliError(f"{other.path} and {first.path} were trained for different tasks")
        for module, (a, b, _) in other.modules.items():
            if module in first.modules:
                fa, fb, _ = first.modules[module]
                if (a.shape[1], b.shape[0]) != (fa.shape[1], fb.shape[0]):
                    raise PeftCliError(f"{other.path} and {first.path} disagree on the shape of {module}")
    if rule in SAME_RANK_RULES:
        ranks = {a.shape[0] for s in sources for a, _, _ in s.modules.values()}
        if len(ranks) > 1:
            raise PeftCliError(
                f"--combine {rule} adds the A and B matrices, which needs one rank everywhere; these adapters have "
                f"ranks {sorted(ranks)} (use cat or svd)"
            )


# --- the rules, entry by entry, as HF PEFT's merge_utils computes them -----------------------------------------


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _drop_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    # DARE: keep each entry with probability `density`, rescaled so the expected update is unchanged.
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator) / density


def _elected(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where an entry agrees with the sign elected across the sources (TIES)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def _combine_entries(
    tensors: list[torch.Tensor], weights: list[float], rule: str, density, majority_sign, generator
) -> torch.Tensor:
    """One combined tensor from same-shaped source tensors (the rule's name without any _svd)."""
    if rule.startswith("ties") or rule.startswith("magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif rule.startswith("dare"):
        tensors = [_drop_at_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights).view(-1, *([1] * tensors[0].dim()))
    if rule.startswith(("ties", "dare_ties")):
        agree = _elected(stacked, majority_sign)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
    return weighted.sum(dim=0)


def _side_weights(weight: float, scale: float) -> tuple[float, float]:
    """w·s split onto A and B; the sign goes on A only, so that it is applied once."""
    root = math.sqrt(abs(weight * scale))
    return (root if weight * scale >= 0 else -root), root


def _order(modules: set[str], order: list[str] | None) -> list[str]:
    # The random rules draw their masks module by module: the model's order makes the draws HF PEFT's.
    if order is None:
        return sorted(modules, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    position = {name: i for i, name in enumerate(order)}
    return sorted(modules, key=lambda n: position.get(n, len(position)))


def combine_loras(
    sources: list[LoraSource],
    weights: list[float],
    rule: str,
    *,
    density: float | None = None,
    majority_sign: str | None = None,
    rank: int | None = None,
    seed: int | None = None,
    module_order: list[str] | None = None,
) -> Combination:
    """The combined adapter (call `check_request` first)."""
    majority_sign = majority_sign or "total"
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    if rule in SAME_RANK_RULES:
        new_rank = sources[0].rank
    elif rule == "cat":
        new_rank = sum(s.rank for s in sources)
    else:
        new_rank = rank or max(s.rank for s in sources)
    names = set().union(*(s.modules for s in sources))
    embeddings = set().union(*(s.embeddings for s in sources))
    out = {}
    for name in _order(names, module_order):
        present = [(s.modules[name], w) for s, w in zip(sources, weights, strict=True) if name in s.modules]
        dtype = present[0][0][0].dtype
        if rule == "cat":
            a, b = _cat(present, new_rank)
        elif rule in SVD_RULES:
            a, b = _svd(present, rule.removesuffix("_svd"), new_rank, density, majority_sign, generator)
        else:
            sides = [_side_weights(w, scale) for (_, _, scale), w in present]
            a = _combine_entries([p[0][0] for p in present], [s[0] for s in sides], rule, density, majority_sign,
                                 generator)  # fmt: skip
            b = _combine_entries([p[0][1] for p in present], [s[1] for s in sides], rule, density, majority_sign,
                                 generator)  # fmt: skip
        out[name] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    notes = []
    partial = sorted(n for n in names if sum(n in s.modules for s in sources) < len(sources))
    if partial:
        notes.append(f"{len(partial)} module(s) are adapted by only some sources (e.g. {partial[0]}); they get "
                     "only those sources' updates")  # fmt: skip
    return Combination(rule, new_rank, out, embeddings, notes)


def _cat(present, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([pair[0] * w * pair[2] for pair, w in present], dim=0)  # HF PEFT's order of roundings
    b = torch.cat([pair[1] for pair, _ in present], dim=1)
    pad = new_rank - a.shape[0]  # HF PEFT gives every module the full summed rank; the rest stays zero
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


def _svd(present, rule: str, new_rank: int, density, majority_sign, generator):
    deltas = [(pair[1].float() @ pair[0].float()) * pair[2] for pair, _ in present]
    rule = "linear" if rule == "svd" else rule
    delta = _combine_entries(deltas, [w for _, w in present], rule, density, majority_sign, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank]
    pad = new_rank - a.shape[0]  # a rank beyond the layer's own dimensions adds nothing
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


# --- writing ---------------------------------------------------------------------------------------------------


def _target_modules(sources: list[LoraSource], modules) -> list[str]:
    """The sources' suffix lists united where each selects exactly its own modules, else every module by name."""
    lists = [s.raw.get("target_modules") for s in sources]
    plain = all(
        isinstance(t, list) and not s.raw.get("layers_to_transform") and not s.raw.get("exclude_modules")
        for t, s in zip(lists, sources, strict=True)
    )
    return sorted(set().union(*lists)) if plain else sorted(modules)


def combined_config(sources: list[LoraSource], combination: Combination) -> dict:
    """adapter_config.json of the combination: the first source's, with the new rank at scale 1."""
    config = dict(sources[0].raw)
    config.update(
        {
            "r": combination.rank,
            "lora_alpha": combination.rank,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": _target_modules(sources, combination.modules),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
    )
    return dict(sorted(config.items()))


def combination_record(sources, weights, rule, density, majority_sign, rank, seed) -> dict:
    """What combination.json says: the sources and the rule, enough to make it again."""
    return {
        "combined_from": [
            {"path": str(s.path.resolve()), "r": s.raw.get("r"), "lora_alpha": s.raw.get("lora_alpha"), "weight": w}
            for s, w in zip(sources, weights, strict=True)
        ],
        "rule": rule,
        "density": density,
        "majority_sign": (majority_sign or "total") if rule in SIGN_RULES else None,
        "rank": rank,
        "seed": (0 if seed is None else seed) if rule in RANDOM_RULES else None,
        "base_model": sources[0].base,
        "peftcli_version": peftcli.__version__,
    }


def write_combined_adapter(
    output: Path, sources: list[LoraSource], combination: Combination, record: dict, overwrite: bool = False
) -> Path:
    """The combination as an HF PEFT adapter directory, written under a hidden name and renamed at the end."""
    tensors = {}
    for name, (a, b) in combination.modules.items():
        embedding = name in combination.embeddings
        kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{HF_KEY_PREFIX}{name}.{kind[0]}"] = a
        tensors[f"{HF_KEY_PREFIX}{name}.{kind[1]}"] = b
    first = sources[0].path
    with staged_dir(Path(output), overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "peftcli_version": peftcli.__version__})
        config = combined_config(sources, combination)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        model = read_recipe(first).get("model")
        if model:  # the base the sources share, so merge and eval find it as they do for a run
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump({"model": model}, sort_keys=False), encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (first / name).is_file():
                shutil.copy2(first / name, tmp / name)
    return Path(output)


def module_order(source: LoraSource) -> list[str]:
    """The base model's module names in its own order (built on the meta device: no weights are read)."""
    from peftcli.models.load import build_empty_model

    section = model_section(source.path, source.base).model_copy(update={"task": adapter_task(source.raw)})
    return [name for name, _ in build_empty_model(section).named_modules()]
