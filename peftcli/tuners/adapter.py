"""Apply a method to a model, and save/load its adapter in the Hugging Face PEFT on-disk format.

The adapter's tensors are exactly the parameters the method added or unfroze. On disk their keys are the
model's parameter names with `base_model.model.` in front, as HF PEFT writes them (adapter name stripped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

import peftcli
from peftcli.errors import AdapterError
from peftcli.models.heads import TASK_HEAD_NAMES, task_head_names
from peftcli.models.quantized_layers import is_quantized, quantized_kind, quantized_layer_names
from peftcli.tuners.hf_format import CONFIG_NAME, HF_KEY_PREFIX, HF_TASK_TYPES, TASKS_BY_HF_TYPE, WEIGHTS_NAME
from peftcli.tuners.inject import freeze, is_base_parameter, unfreeze_modules_to_save, unwrapped_name
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.registry import get_tuner, load_implementation, tuner_for_peft_type


@dataclass
class AdapterInfo:
    """What a method did to a model: which modules it wrapped and which parameters make up the adapter."""

    method: str
    params: BaseModel
    targeted: list[str]
    param_names: list[str]
    task: str = "causal_lm"
    head_modules: tuple[str, ...] = ()  # task heads and modules_to_save, trained in full
    config_extra: dict | None = None
    targeted_parameters: tuple[str, ...] = ()  # parameters adapted directly (fused MoE experts)
    implementation: MethodImplementation | None = None  # the method's torch side, hooks called plainly

    def trainable_count(self, model: nn.Module) -> int:
        named = dict(model.named_parameters())
        return sum(named[n].numel() for n in self.param_names)


def apply_adapter(model: nn.Module, params: BaseModel, context: AdapterContext | None = None) -> AdapterInfo:
    """Freeze the base, add the method, unfreeze `modules_to_save` and any task head; the model keeps an AdapterInfo.

    The adapter is every parameter the method added plus every base parameter it left trainable (BitFit,
    full fine-tuning), in the model's parameter order.
    """
    if getattr(model, "peftcli_adapter", None) is not None:
        raise AdapterError("this model already carries an adapter; peftcli keeps one adapter per model")
    spec = get_tuner(params.name)
    if quantized_layer_names(model) and not spec.capabilities.quantized_base:
        raise AdapterError(
            f"model.quantization: method {params.name} cannot train on a quantized base; load the base unquantized"
        )
    context = context or AdapterContext()
    implementation = load_implementation(params.name)
    was_training = model.training
    freeze(model)
    # By identity, not name: a wrapped layer's base weight moves (q_proj.weight -> q_proj.base_layer.weight)
    # but is still the frozen base, not part of the adapter.
    before = {id(param) for param in model.parameters()}
    applied = implementation.apply_method(model, params, context)
    if not isinstance(applied, AppliedMethod):
        raise TypeError(f"{params.name}.apply_method must return AppliedMethod, not {type(applied).__name__}")
    for name, param in model.named_parameters():
        # A wrapped layer's base stays frozen even when the method gave it a new parameter object (a Conv1D
        # weight seen as a linear one).
        if id(param) not in before and not is_base_parameter(name):
            param.requires_grad_(True)
    requested = list(getattr(params, "modules_to_save", None) or [])
    heads = task_head_names(model)
    if heads:  # HF PEFT lists both `classifier` and `score` for classification tasks; the model has one
        requested = [n for n in requested if n not in TASK_HEAD_NAMES]
    to_save = requested + heads
    unfreeze_modules_to_save(model, to_save, applied.targeted)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    model.train(was_training)  # new layers (dropout!) follow the model's mode: eval stays eval
    info = AdapterInfo(
        params.name,
        params,
        applied.targeted,
        names,
        context.task,
        tuple(to_save),
        dict(applied.config_extra),
        tuple(applied.targeted_parameters),
        implementation,
    )
    model.peftcli_adapter = info
    return info


def adapter_info(model: nn.Module) -> AdapterInfo:
    """The AdapterInfo a model was given by `apply_adapter`."""
    info = getattr(model, "peftcli_adapter", None)
    if info is None:
        raise AdapterError("the model has no adapter")
    return info


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _is_shard(tensor: torch.Tensor) -> bool:
    """A distributed tensor (FSDP2) rather than plain values: saving it would write one rank's piece."""
    return type(tensor).__name__ == "DTensor"


def adapter_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk names (from `state_dict` if given, e.g. a gathered one)."""
    info = adapter_info(model)
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    named_params = dict(model.named_parameters())
    named = {}
    for name in info.param_names:
        tensor = source[name]
        full = _full_shape(named_params[name])
        if _is_shard(tensor) or tensor.numel() == 0 or tuple(tensor.shape) != full:
            raise AdapterError(
                f"refusing to save {name}: it is a slice {tuple(tensor.shape)} of a {full} tensor (sharded by ZeRO-3 "
                "or FSDP), not the full tensor; it must be gathered before saving"
            )
        named[name] = tensor.detach().to("cpu").contiguous()
    return info.implementation.adapter_tensors(model, info.params, named)


def hf_adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json contents: the method's fields plus the common ones HF PEFT writes."""
    info = adapter_info(model)
    spec = get_tuner(info.method)
    config = spec.to_hf_config(info.params, info.targeted)
    config.update(info.config_extra or {})
    if info.targeted_parameters:
        config["target_parameters"] = sorted(info.targeted_parameters)
        config["target_modules"] = config.get("target_modules") or None  # HF PEFT's form for "parameters only"
    config.update(info.implementation.config_updates(model, info.params))
    if info.head_modules:
        config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(info.head_modules))
    _compact_module_lists(model, config, info.targeted)
    if "fan_in_fan_out" in config and any(_stored_transposed(model, name) for name in info.targeted):
        config["fan_in_fan_out"] = True  # Conv1D layers (GPT-2); HF PEFT would otherwise warn and set it
    config.update(
        {
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            # HF PEFT builds a task wrapper from task_type, which needs a transformers model.
            "task_type": HF_TASK_TYPES[info.task] if _is_transformers_model(model) else None,
            "inference_mode": True,
            "auto_mapping": None,
        }
    )
    return dict(sorted(config.items()))


def _compact_module_lists(model: nn.Module, config: dict, targeted: list[str]) -> None:
    """target_modules (and IA3's feedforward_modules) as layer-name suffixes where those select exactly the same
    modules: seven names instead of one path per layer (560 on a 70B model). HF PEFT and our loader both match a
    list entry against whole dotted-name suffixes. Left as full paths when suffixes would select more (a subset of
    layers, say); IA3's lists are compacted together or not at all, as HF PEFT wants one inside the other."""
    inside = tuple(name + "." for name in targeted)  # an adapter's own submodules live inside what it wraps
    every = {unwrapped_name(name) for name, _ in model.named_modules() if name}
    every = {name for name in every if not name.startswith(inside)}
    keys = [key for key in ("target_modules", "feedforward_modules") if isinstance(config.get(key), list)]
    compact = {key: _suffixes_selecting(every, config[key]) for key in keys}
    if all(compact[key] is not None for key in keys):
        config.update(compact)


def _suffixes_selecting(every: set[str], names: list[str]) -> list[str] | None:
    suffixes = {name.rsplit(".", 1)[-1] for name in names}
    selected = {name for name in every if name.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == set(names) else None


def _stored_transposed(model: nn.Module, name: str) -> bool:
    base = getattr(model.get_submodule(name), "base_layer", None)
    return bool(getattr(base, "stored_transposed", False))


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def save_adapter(
    model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None, state_dict: dict | None = None
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, state_dict)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "peftcli_version": peftcli.__version__})
    config = hf_adapter_config(model, base_model_name_or_path)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(adapter_dir: str | Path) -> tuple[str, BaseModel, dict]:
    """The method name, its params and the raw config of a saved adapter (ours or HF PEFT's)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME}; is this an adapter directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    peft_type = raw.get("peft_type")
    spec = tuner_for_peft_type(str(peft_type))
    if spec is None:
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not a method peftcli can load")
    try:
        params = spec.from_hf_config(raw)
    except (ValueError, KeyError, ValidationError) as exc:
        raise AdapterError(f"{path}: {exc}") from None
    return spec.name, params, raw


def adapter_task(raw_config: dict) -> str:
    """The task an adapter was trained for, from its adapter_config.json (causal_lm when unrecorded)."""
    return TASKS_BY_HF_TYPE.get(str(raw_config.get("task_type")), "causal_lm")


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors; a missing, truncated or foreign file is one line."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type; any reader failure means the same here
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterError(
            f"{path}: cannot be read ({reason}): the file is truncated or damaged; copy it again, or write it "
            "again from the run (peft train ... --resume finishes an interrupted one)"
        ) from None


def load_adapter(model: nn.Module, adapter_dir: str | Path, tokenizer=None) -> AdapterInfo:
    """Add a saved adapter to a base model; every adapter tensor must find its place, with matching shape."""
    _, params, raw = read_adapter_config(adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    info = apply_adapter(model, params, AdapterContext(task=adapter_task(raw), tokenizer=tokenizer))
    load_adapter_tensors(model, tensors)
    for name in info.param_names:
        dict(model.named_parameters())[name].requires_grad_(False)
    return info


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy on-disk adapter tensors into the model; missing, unexpected or mis-shaped keys are errors."""
    info = adapter_info(model)
    named = dict(model.named_parameters())
    by_name = info.implementation.load_tensors(model, info.params, tensors)
    tensors = {HF_KEY_PREFIX + name: tensor for name, tensor in by_name.items()}
    expected = {HF_KEY_PREFIX + n: n for n in info.param_names}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise AdapterError(f"adapter does not fit this model: {'; '.join(parts)}")
    for key, name in expected.items():
        param, tensor = named[name], tensors[key]
        if tuple(param.shape) != tuple(tensor.shape):
            raise AdapterError(
                f"adapter does not fit this model: {key} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(param.shape)} (wrong base model?)"
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


def continue_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Fill the model's fresh adapter with a saved adapter's tensors (`model.adapter`: training continues them)."""
    try:
        load_adapter_tensors(model, read_adapter_weights(adapter_dir))
    except AdapterError as exc:
        hint = ""
        if "missing" in str(exc) or "unexpected" in str(exc):
            hint = "; method.target_modules (and modules_to_save) must select what that adapter's run selected"
        raise AdapterError(f"model.adapter: {adapter_dir}: {exc}{hint}") from None


def merge_refusal(method: str) -> str:
    """Why a method cannot be merged into the base weights, and what to do instead."""
    spec = get_tuner(method)
    reason = spec.merge_refusal or f"{method} does not change the base weights in a way that folds in"
    return f"method {method} cannot be merged: {reason}"


def merge_adapter(model: nn.Module) -> None:
    """Fold the model's adapter into its base weights in place (idempotent); refuses non-mergeable methods.

    Methods that train base tensors directly (BitFit, full fine-tuning) are already "merged": nothing to do.
    """
    info = adapter_info(model)
    spec = get_tuner(info.method)
    if not spec.capabilities.mergeable:
        raise AdapterError(merge_refusal(info.method))
    if spec.capabilities.kind == "trains_base":
        return
    on_quantized = [name for name, module in model.named_modules() if is_quantized(getattr(module, "base_layer", None))]
    if on_quantized:
        raise AdapterError(
            f"cannot merge in memory: {on_quantized[0]} (and {len(on_quantized) - 1} more) wraps a "
            f"{quantized_kind(model.get_submodule(on_quantized[0]).base_layer)} quantized layer, and folding the "
            "update into integer blocks would round most of it away; merge into the unquantized base with "
            "`peft merge` instead"
        )
    info.implementation.merge_all(model, info.params)


def unmerge_adapter(model: nn.Module) -> None:
    """Take a merged adapter back out of the base weights (idempotent)."""
    info = adapter_info(model)
    spec = get_tuner(info.method)
    if spec.capabilities.mergeable and spec.capabilities.kind != "trains_base":
        info.implementation.unmerge_all(model, info.params)
