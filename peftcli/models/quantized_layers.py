"""Layers that bitsandbytes quantized: recognising them, their logical shape and their weight as floats.

A quantized layer's `weight` holds packed integer blocks (4-bit: a (n/2, 1) uint8 column), so methods ask
here for the shape and, where their maths needs the weight itself (DoRA's norm), for a dequantized copy.
Nothing here imports bitsandbytes unless a quantized layer is actually present.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_KINDS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}


def quantized_kind(module: nn.Module) -> str | None:
    """'4-bit' or '8-bit' for a bitsandbytes linear layer (or a subclass of one), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in QUANTIZED_KINDS and cls.__module__.startswith("bitsandbytes"):
            return QUANTIZED_KINDS[cls.__name__]
    return None


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit / Linear8bitLt layer."""
    return quantized_kind(module) is not None


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of every quantized linear layer of the model."""
    return [name for name, module in model.named_modules() if is_quantized(module)]


def weight_shape(module: nn.Module) -> torch.Size:
    """The shape the layer's weight has as a matrix (out, in[, kernel]), whatever its storage."""
    if is_quantized(module):
        return torch.Size((module.out_features, module.in_features))
    return getattr(module.weight, "ds_shape", module.weight.shape)  # ZeRO-3 partitioned: the whole shape


def float_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an fp32 matrix: the weight itself, or a dequantized copy for a quantized layer."""
    kind = quantized_kind(module)
    if kind is None:
        return module.weight.float()
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if kind == "4-bit":
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()


def parameter_count(param: torch.Tensor) -> int:
    """How many weights a parameter holds: a packed 4-bit parameter counts its logical elements."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()
