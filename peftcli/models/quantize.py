"""model.quantization: load the frozen base through bitsandbytes and make it safe to train adapters on.

The steps: map the recipe section to a `BitsAndBytesConfig` (keeping the output and task heads in floating
point), and after loading, `prepare_quantized_model`: stop the CPU kernel from repacking 4-bit weights in
place (see `disable_cpu_repacking`), and hold the norms and the output head in fp32.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from peftcli.recipe.schema import QuantizationSection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


def compute_dtype(section: QuantizationSection) -> torch.dtype:
    """The dtype 4-bit blocks are multiplied in: bf16 on a GPU (fp16 without bf16) or a CPU with native bf16."""
    if section.compute_dtype != "auto":
        return DTYPES[section.compute_dtype]
    from peftcli.models.hardware import cpu_has_native_bf16

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call 8-bit cast notice and its optional-kernel probe on CPUs."""
    for name in ("bitsandbytes", "bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


def require_bitsandbytes(key: str):
    """Import bitsandbytes, or say how to get it, naming the recipe key that needs it."""
    from peftcli.errors import ModelError

    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ModelError(f"{key} needs bitsandbytes ({exc}); install it with `pip install bitsandbytes`") from None
    return bitsandbytes


def kept_in_float(empty_model: nn.Module, section: QuantizationSection) -> list[str]:
    """Modules left unquantized: the output head, a classification head, tied weights, and skip_modules."""
    from peftcli.models.heads import output_head_names

    kept = set(output_head_names(empty_model))
    tied = getattr(empty_model, "all_tied_weights_keys", None) or {}
    kept.update(key.removesuffix(".weight") for pair in tied.items() for key in pair)
    kept.update(section.skip_modules)
    return sorted(kept)


def bitsandbytes_config(section: QuantizationSection, keep: list[str]):
    """The transformers `BitsAndBytesConfig` for a recipe's model.quantization."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes("model.quantization")
    if section.bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=section.outlier_threshold if section.outlier_threshold is not None else 6.0,
            llm_int8_skip_modules=keep,
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type or "nf4",
        bnb_4bit_use_double_quant=True if section.double_quant is None else section.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(section),
        bnb_4bit_quant_storage=STORAGE_DTYPES[section.storage_dtype or "uint8"],
        llm_int8_skip_modules=keep,
    )


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep 4-bit weights in the layout that has a backward pass, on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place the first time it runs
    in eval mode on an input without grad (an evaluation pass, a generation). From then on its matmul takes
    a kernel with no autograd support, and adapter gradients come back None or wrong without any error.
    Turning the repacking off keeps the trainable layout; returns how many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def prepare_quantized_model(model: nn.Module, section: QuantizationSection) -> nn.Module:
    """Make a freshly loaded quantized base ready for adapter training (k-bit preparation).

    Freezes every base tensor; holds norms (one-dimensional float tensors) and the output head in fp32,
    where half precision loses the small differences training depends on; stops CPU repacking.
    Input gradients for activation checkpointing are switched on by the loop together with checkpointing.
    """
    from peftcli.models.heads import output_head_names
    from peftcli.models.quantized_layers import is_quantized

    disable_cpu_repacking(model)
    heads = set(output_head_names(model))
    for name, module in model.named_modules():
        if is_quantized(module):
            continue
        upcast_all = name in heads
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
            if param.is_floating_point() and param.dtype != torch.float32 and (upcast_all or param.dim() == 1):
                param.data = param.data.float()
    for module in model.modules():
        if is_quantized(module):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
    model.peftcli_quantization = section
    return model


def describe_quantization(model: nn.Module) -> str | None:
    """One line for logs and the run summary: what the base was quantized to, and how many layers."""
    from peftcli.models.quantized_layers import quantized_layer_names

    section = getattr(model, "peftcli_quantization", None)
    if section is None:
        return None
    layers = len(quantized_layer_names(model))
    if section.bits == 8:
        threshold = section.outlier_threshold if section.outlier_threshold is not None else 6.0
        return f"int8 (LLM.int8, outlier threshold {threshold:g}) in {layers} linear layers"
    double = "double quantization, " if section.double_quant in (None, True) else ""
    dtype = str(compute_dtype(section)).removeprefix("torch.")
    return f"{section.quant_type or 'nf4'} (4-bit, {double}compute {dtype}) in {layers} linear layers"
