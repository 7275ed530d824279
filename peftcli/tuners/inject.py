"""Walking, wrapping and freezing modules: free functions shared by every method that wraps layers."""

from __future__ import annotations

from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import output_head_names, task_head_names
from peftcli.models.quantized_layers import is_quantized
from peftcli.tuners.protocol import AdapterLayer
from peftcli.tuners.targets import ALL_LINEAR, select_targets, short_names, unmatched_entries

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "Linear": (nn.Linear,),
    "Embedding": (nn.Embedding,),
    "Conv1d": (nn.Conv1d,),
    "Conv2d": (nn.Conv2d,),
}


def _transformers_conv1d() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def layer_classes(layer_types: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    """The module classes of LAYER_TYPES keys. "Linear" includes transformers' Conv1D (GPT-2 and its kin),
    a linear layer that stores its weight transposed."""
    classes = tuple(cls for t in layer_types for cls in LAYER_TYPES[t])
    return classes + _transformers_conv1d() if "Linear" in layer_types else classes


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D (weight stored (in, out), y = x W + b) as an nn.Linear over the same tensors.

    Every method then wraps it as the linear layer it is; the adapter's tensors have the shapes HF PEFT gives
    them (its `fan_in_fan_out`). `stored_transposed` tells the merge to write the weight back as stored.
    """
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.t(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    linear.stored_transposed = True
    return linear


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def find_targets(
    model: nn.Module,
    target: list[str] | str,
    exclude: list[str] | str | None,
    layer_types: tuple[str, ...],
    method: str,
) -> list[str]:
    """Module names to adapt; an error that lists candidates when nothing (or part of a list) matches.

    A chosen transformers Conv1D is replaced in the model by its nn.Linear view (`conv1d_as_linear`), so the
    method wraps a plain linear layer.
    """
    classes = layer_classes(layer_types)
    heads = task_head_names(model)  # trained in full, never wrapped
    supported = [
        name for name, module in model.named_modules() if isinstance(module, classes) and not _inside(name, heads)
    ]
    candidates = ", ".join(short_names(supported)) or "none"
    chosen = select_targets(supported, target, exclude, output_head_names(model))
    if target != ALL_LINEAR:
        missing = unmatched_entries(supported, target)
        all_names = [name for name, _ in model.named_modules() if name]
        wrong_type = [e for e in missing if not unmatched_entries(all_names, [e])]
        if wrong_type:
            raise PeftCliError(
                f"method.target_modules: {', '.join(wrong_type)} is not a layer {method} can wrap "
                f"({', '.join(layer_types)}); candidates: {candidates}"
            )
        if missing:
            raise PeftCliError(f"method.target_modules: {', '.join(missing)} matched nothing; candidates: {candidates}")
    if not chosen:
        shown = target if isinstance(target, str) else ", ".join(target)
        raise PeftCliError(
            f"method.target_modules: {shown} matched no {'/'.join(layer_types)} module of this model "
            f"(after exclude_modules); candidates: {candidates}"
        )
    conv1d = _transformers_conv1d()
    for name in chosen:
        module = model.get_submodule(name)
        if conv1d and isinstance(module, conv1d):
            replace_module(model, name, conv1d_as_linear(module))
    return chosen


def unwrapped_name(name: str) -> str:
    """A parameter or module name as the base model has it: every `base_layer` segment a wrapper added removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def is_base_parameter(name: str) -> bool:
    """Whether a parameter name is a wrapped layer's own base tensor (`q_proj.base_layer.weight`), not one of
    the wrapper's (`experts.base_layer.lora_A.weight` belongs to an inner wrapper)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "base_layer"


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of a dotted name and the child's attribute name."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where module `name` was."""
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    """Turn off gradients for every parameter (the base is frozen before adapters are added)."""
    for param in model.parameters():
        param.requires_grad_(False)


def unfreeze_modules_to_save(model: nn.Module, names: list[str], adapted: list[str]) -> list[str]:
    """Train the named modules in full (suffix match); returns the parameter names that joined the adapter."""
    if not names:
        return []
    matched = [
        name for name, _ in model.named_modules() if name and any(name == n or name.endswith("." + n) for n in names)
    ]
    missing = [n for n in names if not any(m == n or m.endswith("." + n) for m in matched)]
    if missing:
        raise PeftCliError(f"method.modules_to_save: {', '.join(missing)} matched no module of this model")
    clash = [m for m in matched if m in adapted]
    if clash:
        raise PeftCliError(
            f"method.modules_to_save: {', '.join(clash)} is also adapted by target_modules; "
            "exclude it there (exclude_modules) or leave it out of modules_to_save"
        )
    quantized = [m for m in matched for sub in model.get_submodule(m).modules() if is_quantized(sub)]
    if quantized:
        raise PeftCliError(
            f"method.modules_to_save: {quantized[0]} is quantized by model.quantization, so it cannot be trained "
            "in full; list it in model.quantization.skip_modules to keep it in floating point"
        )
    _untie_from_the_rest(model, matched)
    param_names = []
    for name in matched:
        for pname, param in model.get_submodule(name).named_parameters():
            param.requires_grad_(True)
            param_names.append(f"{name}.{pname}")
    return param_names


def _untie_from_the_rest(model: nn.Module, matched: list[str]) -> None:
    """Give a module to save its own copy of any weight it shares with a module that is not saved.

    An output head tied to the input embedding (SmolLM2, Gemma, Llama-3.2) is trained as a separate copy, as
    HF PEFT does: the input embedding stays the frozen base, and the adapter stores `lm_head.weight`.
    """
    inside = tuple(m + "." for m in matched)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for name in matched:
        for _, owner in model.get_submodule(name).named_modules():
            for leaf, param in list(owner._parameters.items()):
                others = [n for n in names_of.get(id(param), []) if not n.startswith(inside)]
                if param is None or not others:
                    continue
                if hasattr(param, "ds_id"):
                    raise PeftCliError(
                        f"method.modules_to_save: {name} shares its weight with {others[0]} (tied), and a separate "
                        "trainable copy cannot be made on a model built partitioned (ZeRO-3); use zero2 or fsdp2"
                    )
                owner._parameters[leaf] = nn.Parameter(param.detach().clone(), requires_grad=False)


class WrappedLinear(AdapterLayer):
    """A frozen base linear layer wrapped by a method's layer: the base's sizes and weight, as callers expect."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self):
        return self.base_layer.weight


class AdditiveLinear(WrappedLinear):
    """A wrapped linear layer whose method adds `delta_weight()` (fp32) to the base weight when merged."""

    def delta_weight(self):
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the update into the base weight (once; merging twice is a no-op)."""
        self._shift(+1)

    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        self._shift(-1)

    def _shift(self, sign: int) -> None:
        import torch

        if self.merged == (sign > 0):
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.data = (weight.data.float() + sign * self.delta_weight().to(weight.device)).to(weight.dtype)
        self.merged = sign > 0
