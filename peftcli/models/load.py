"""Build the base model and tokenizer a recipe names: hub id, local HF directory or GGUF file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import ModelError
from peftcli.recipe.schema import ModelSection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16, AMX); elsewhere bf16 runs several times slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype() -> torch.dtype | str:
    """dtype: auto. On a GPU the checkpoint's own dtype; on a CPU fp32 unless it computes bf16 natively."""
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "auto"
    return torch.float32


def is_gguf(name_or_path: str) -> bool:
    """True when the recipe points at a GGUF file."""
    return name_or_path.lower().endswith(".gguf")


def _source_kwargs(name_or_path: str) -> tuple[str, dict]:
    """from_pretrained's first argument and the keyword that selects a GGUF file inside a directory."""
    if is_gguf(name_or_path):
        path = Path(name_or_path)
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _explain_load_failure(what: str, name: str, exc: Exception) -> ModelError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not os.path.exists(name) and ("offline" in text.lower() or "connect" in text.lower() or "resolve" in text):
        return ModelError(
            f"model.name_or_path: cannot fetch {what} {name!r} from the hub ({text}); "
            "download it first and point the recipe at the local directory"
        )
    return ModelError(f"model.name_or_path: cannot load {what} from {name!r}: {text}")


def _quiet_transformers() -> None:
    """No per-tensor progress bars or tensor-parallel notes in a training log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    logging.getLogger("transformers.distributed.tensor_parallel").setLevel(logging.ERROR)


def load_tokenizer(section: ModelSection):
    """The tokenizer, with a pad token that is never confused with the end-of-sequence label."""
    from transformers import AutoTokenizer

    name = section.tokenizer or section.name_or_path
    source, extra = _source_kwargs(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code, **extra
        )
    except Exception as exc:  # transformers raises many types for a bad path or repo
        raise _explain_load_failure("the tokenizer", name, exc) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token without adding one to the vocabulary.

    Prefer a dedicated pad token already in the vocabulary, then unk, then eos. Padding is masked by
    length in our collator, never by token id, so reusing eos as pad does not stop the model learning eos.
    """
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab:
            tokenizer.pad_token = candidate
            return
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ModelError("model.tokenizer: the tokenizer has no pad, unk or eos token to pad with")


def load_base_model(section: ModelSection, device_map: str | None = None) -> nn.Module:
    """The base model in the recipe's dtype, with the recipe's attention implementation."""
    from transformers import AutoModelForCausalLM

    source, extra = _source_kwargs(section.name_or_path)
    kwargs: dict = {
        "revision": section.revision,
        "trust_remote_code": section.trust_remote_code,
        "attn_implementation": section.attn_implementation,
        **extra,
    }
    if section.dtype != "auto":
        kwargs["dtype"] = DTYPES[section.dtype]
    elif extra:
        kwargs["dtype"] = torch.float32  # GGUF is dequantized; fp32 keeps every bit it had
    else:
        kwargs["dtype"] = auto_dtype()
    if device_map is not None:
        kwargs["device_map"] = device_map
    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise _explain_load_failure("the model", section.name_or_path, exc) from None
    if extra:
        # A GGUF-loaded model keeps a GGUF quantization config that forbids saving; the weights are plain now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    model.config.use_cache = False
    return model


def build_empty_model(section: ModelSection) -> nn.Module:
    """The model's architecture on the meta device (no weights read): enough to match target modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, extra = _source_kwargs(section.name_or_path)
    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code, **extra
        )
    except Exception as exc:
        raise _explain_load_failure("the model config", section.name_or_path, exc) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)
