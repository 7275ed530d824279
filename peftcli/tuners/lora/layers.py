"""LoRA's torch side (see tuners/protocol.py): wrap the targeted layers, merge them, and the hooks that save a
PiSSA/OLoRA adapter as plain LoRA, read HF PEFT's extra embedding tensors and give LoRA+ its learning rates.

The layer classes live in modules.py, the DoRA variant in variants.py, PiSSA/OLoRA in init.py.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from peftcli.errors import AdapterError, PeftCliError
from peftcli.models.experts import fused_expert_parameters
from peftcli.models.quantized_layers import is_quantized, quantized_kind
from peftcli.tuners.hf_format import HF_KEY_PREFIX
from peftcli.tuners.inject import find_targets, replace_module
from peftcli.tuners.lora.init import plain_lora_config, plain_lora_factors
from peftcli.tuners.lora.modules import (
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    layer_class,
    lora_layers,
)
from peftcli.tuners.lora.parameters import LoraParameter
from peftcli.tuners.lora.patterns import check_pattern_keys, in_selected_layers, layer_index, pattern_value
from peftcli.tuners.lora.spec import SPEC, LoraParams, changes_base
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import ALL_LINEAR

__all__ = [  # the layer classes are re-exported: other code reaches LoRA through this module
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraParameter",
    "adapter_tensors",
    "apply_method",
    "config_updates",
    "load_tensors",
    "lora_layers",
    "optimizer_groups",
]

# --- applying the method ----------------------------------------------------------------------------------------


def _weight_sharers(model: nn.Module) -> dict[int, list[str]]:
    """Module names by the id of their own `weight` parameter (several names: a tied or reused weight)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if name else None
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return owners


def _select_layers(params: LoraParams, found: list[str]) -> list[str]:
    kept = [
        name
        for name in found
        if in_selected_layers(name, params.target_modules, params.layers_to_transform, params.layers_pattern)
    ]
    if not kept:
        indices = sorted({i for i in (layer_index(n, params.layers_pattern) for n in found) if i is not None})
        raise PeftCliError(
            f"method.layers_to_transform: {params.layers_to_transform} keeps none of the {len(found)} matched "
            f"modules (block indices found: {indices or 'none'}"
            + (f" after layers_pattern {params.layers_pattern}" if params.layers_pattern else "")
            + ")"
        )
    return kept


def _zero3(weight: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions (or will partition) the base weights."""
    return hasattr(weight, "ds_id") or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def _check_layer(name: str, base: nn.Module, params: LoraParams, r: int, sharers: list[str]) -> None:
    """Refuse, naming the recipe key, what a layer cannot do with these params."""
    kind = type(base).__name__
    weight = base.weight
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        odd = []
        if base.groups != 1:
            odd.append(f"groups={base.groups}")
        if any(d != 1 for d in base.dilation):
            odd.append(f"dilation={base.dilation}")
        if base.padding_mode != "zeros":
            odd.append(f"padding_mode={base.padding_mode!r}")
        if odd:
            raise PeftCliError(
                f"method.target_modules: {name} is a {kind} with {', '.join(odd)}, which LoRA does not adapt "
                "(only groups=1, no dilation, zero padding); leave it out (method.exclude_modules)"
            )
        if changes_base(params.init):
            raise PeftCliError(
                f"method.init: {params.init} starts linear layers only (as in HF PEFT), but {name} is a {kind}; "
                "exclude it (method.exclude_modules) or use init: default"
            )
    if isinstance(base, nn.Embedding) and base.max_norm is not None:
        raise PeftCliError(
            f"method.target_modules: {name} is an Embedding with max_norm, which LoRA does not adapt; leave it out"
        )
    if params.dora and _zero3(weight):
        raise PeftCliError(
            "method.dora: DoRA reads each layer's whole base weight in every forward, which DeepSpeed ZeRO-3 "
            "keeps partitioned; use ZeRO-2 (or FSDP), or set dora: false"
        )
    if changes_base(params.init) and (hasattr(weight, "ds_id") or (weight.numel() == 0 and not weight.is_meta)):
        raise PeftCliError(
            f"method.init: {name}'s weight is partitioned (DeepSpeed ZeRO-3), and {params.init} needs the whole "
            "weight to start from; use ZeRO-2, or init: default"
        )
    if changes_base(params.init) and is_quantized(base):
        raise PeftCliError(
            f"method.init: {params.init} rewrites {name}'s weight, which is quantized ({quantized_kind(base)}); "
            "use init: default, or train without model.quantization"
        )
    if changes_base(params.init) and isinstance(base, nn.Linear):
        if not weight.is_floating_point():
            raise PeftCliError(f"method.init: {params.init} needs a float base weight; {name} is {weight.dtype}")
        if r > min(weight.shape):
            key = "method.rank_pattern" if r != params.r else "method.r"
            raise PeftCliError(
                f"{key}: {params.init} needs r <= min(in, out) = {min(weight.shape)} for {name}, got {r}"
            )
        if sharers:
            raise PeftCliError(
                f"method.init: {params.init} rewrites {name}'s weight, which is tied to {', '.join(sharers)}; "
                "exclude it (method.exclude_modules) or use init: default"
            )


def _parameter_targets(model: nn.Module, wanted: list[str], layers: list[str]) -> list[tuple[str, str, str]]:
    """(module name, parameter name, full name) of each parameter `wanted` names, in the model's order.

    Matched as HF PEFT matches them (the full name or a dotted suffix), a module's parameters in registration
    order, which is also the order the wrappers nest in.
    """
    found, seen = [], set()
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            if full in seen or not any(full == w or full.endswith("." + w) for w in wanted):
                continue
            seen.add(full)
            if module_name in layers:
                raise PeftCliError(
                    f"method.target_parameters: {full} belongs to {module_name}, which target_modules already "
                    "adapts; name it in one of the two only"
                )
            if _zero3(param):
                raise PeftCliError(
                    f"method.target_parameters: {full} is partitioned by DeepSpeed ZeRO-3, which gathers it only "
                    "inside its module's forward; use launch.preset zero2 or fsdp2"
                )
            if param.dim() not in (2, 3) or not param.is_floating_point():
                raise PeftCliError(
                    f"method.target_parameters: {full} is a {param.dim()}-D {param.dtype} tensor; LoRA adapts 2-D "
                    "weights and 3-D stacks of expert weights (experts x out x in) in floating point"
                )
            found.append((module_name, leaf, full))
    missing = [w for w in wanted if not any(full == w or full.endswith("." + w) for _, _, full in found)]
    if missing:
        # shown as a recipe would name them: the part after the block index (mlp.experts.gate_up_proj)
        candidates = sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in fused_expert_parameters(model)})
        raise PeftCliError(
            f"method.target_parameters: {', '.join(missing)} matched no parameter of this model; "
            f"fused expert parameters: {', '.join(candidates) or 'none'}"
        )
    return found


def _wrap_parameters(model: nn.Module, params: LoraParams, found: list[tuple[str, str, str]]) -> list[str]:
    for module_name, leaf, full in found:
        r = int(pattern_value(params.rank_pattern, full, params.r))
        alpha = float(pattern_value(params.alpha_pattern, full, params.alpha))
        # Wrapping the module's current occupant nests the wrappers of one module's parameters.
        layer = LoraParameter(model.get_submodule(module_name), leaf, r, alpha, params.rslora, params.init)
        replace_module(model, module_name, layer)
    return [full for _, _, full in found]


def apply_method(model: nn.Module, params: LoraParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted layer of `model` in the LoRA layer of its kind, and every targeted parameter."""
    targets: list[str] = []
    if params.target_modules != []:
        # `all-linear` means linear layers only; embeddings and convs are adapted when named.
        layer_types = ("Linear",) if params.target_modules == ALL_LINEAR else SPEC.capabilities.layer_types
        found = find_targets(model, params.target_modules, params.exclude_modules, layer_types, "lora")
        targets = _select_layers(params, found)
    by_parameter = _parameter_targets(model, params.target_parameters, targets)
    check_pattern_keys(params, [name for name, _ in model.named_modules() if name] + [f for _, _, f in by_parameter])
    owners = _weight_sharers(model)
    for name in targets:
        base = model.get_submodule(name)
        sharers = [n for n in owners.get(id(base.weight), []) if n != name]
        r = int(pattern_value(params.rank_pattern, name, params.r))
        alpha = float(pattern_value(params.alpha_pattern, name, params.alpha))
        _check_layer(name, base, params, r, sharers)
        layer = layer_class(base)(base, r, alpha, params.dropout, params.rslora, params.init, params.dora)
        layer.shares_weight_with = tuple(sharers)
        replace_module(model, name, layer)
    return AppliedMethod(targets, targeted_parameters=_wrap_parameters(model, params, by_parameter))


# --- saving, loading and training hooks (see tuners/protocol.py) --------------------------------------------------


def adapter_tensors(model: nn.Module, params: LoraParams, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors; a PiSSA/OLoRA adapter is written as the plain rank-2r LoRA that fits the original base."""
    tensors = {HF_KEY_PREFIX + name: tensor for name, tensor in named.items()}
    for layer_name, layer in lora_layers(model).items():
        if layer.lora_initial_A is None:
            continue
        key_a, key_b = (f"{HF_KEY_PREFIX}{layer_name}.{part}" for part in layer.factor_names)
        tensors[key_a], tensors[key_b] = plain_lora_factors(
            tensors[key_a], tensors[key_b], layer.lora_initial_A.cpu(), layer.lora_initial_B.cpu()
        )
    return tensors


def config_updates(model: nn.Module, params: LoraParams) -> dict:
    """adapter_config.json fields of the saved form: a PiSSA/OLoRA adapter is saved as plain LoRA of rank 2r."""
    return plain_lora_config(params) if changes_base(params.init) else {}


def load_tensors(model: nn.Module, params: LoraParams, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors under parameter names.

    HF PEFT also saves the full base weight of an embedding it targets by a short name
    (`<embedding>.base_layer.weight`) and loads it back into the base; so do we, so the model is the one HF
    PEFT would build.
    """
    layers = lora_layers(model)
    named = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(HF_KEY_PREFIX)
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in layers and leaf in ("weight", "bias"):
            target = getattr(layers[owner].base_layer, leaf)
            if target is None or tuple(target.shape) != tuple(tensor.shape):
                shape = None if target is None else tuple(target.shape)
                raise AdapterError(
                    f"adapter does not fit this model: {key} has shape {tuple(tensor.shape)}, the base has {shape} "
                    "(was the vocabulary resized?)"
                )
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            continue
        named[name] = tensor
    return named


def optimizer_groups(model: nn.Module, params: LoraParams) -> list[dict]:
    """LoRA+ (arXiv 2402.12354): B matrices learn `loraplus_lr_ratio` times faster than A.

    As HF PEFT's create_loraplus_optimizer: A and B of embedding layers get `loraplus_lr_embedding` (here a
    multiple of the recipe's rate; unset, the recipe's rate); every other trainable tensor named lora_B or with
    one dimension (DoRA magnitudes, biases) gets the ratio; everything else the recipe's rate.
    """
    if params.loraplus_lr_ratio is None:
        return []
    embedding = {
        id(p)
        for layer in lora_layers(model).values()
        if isinstance(layer, LoraEmbedding)
        for p in (layer.lora_embedding_A, layer.lora_embedding_B)
    }
    groups = {
        "lora_plus_A": ([], 1.0),
        "lora_plus_B": ([], float(params.loraplus_lr_ratio)),
        "lora_plus_embedding": ([], float(params.loraplus_lr_embedding or 1.0)),
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            group = "lora_plus_embedding"
        elif "lora_B" in name or param.dim() == 1:
            group = "lora_plus_B"
        else:
            group = "lora_plus_A"
        groups[group][0].append(param)
    return [{"name": name, "params": ps, "lr_scale": scale} for name, (ps, scale) in groups.items() if ps]


METHOD = MethodImplementation(
    apply_method=apply_method,
    adapter_tensors=adapter_tensors,
    load_tensors=load_tensors,
    optimizer_groups=optimizer_groups,
    config_updates=config_updates,
)
