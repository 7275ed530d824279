"""Build the base model and tokenizer a recipe names: hub id, local HF directory or GGUF file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import ModelError
from peftcli.models.hardware import cpu_has_native_bf16
from peftcli.models.hub import offline_explanation, prepare_hub_access
from peftcli.models.integrity import check_loaded_weights, check_model_path, check_tokenizer_path
from peftcli.recipe.schema import ModelSection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


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
    prepare_hub_access(name_or_path)
    if is_gguf(name_or_path):
        path = Path(name_or_path)
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _explain_load_failure(what: str, name: str, exc: Exception) -> ModelError:
    offline = offline_explanation(name)
    if offline is not None:
        return ModelError(offline)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" names the error next
        text = f"{text} {lines[1]}"
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
    # Usually the first read of the model directory in a run: a broken one is refused here, before the data.
    if section.tokenizer:
        check_tokenizer_path(name)
    else:
        check_model_path(name)
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


# The transformers Auto class that builds a model with each task's head.
AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def auto_class(task: str):
    """The Auto class for a task (model.task)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def _load_config(section: ModelSection):
    from transformers import AutoConfig

    check_model_path(section.name_or_path, weights=False)  # a config is enough to plan or list targets
    source, extra = _source_kwargs(section.name_or_path)
    try:
        return AutoConfig.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code, **extra
        )
    except Exception as exc:
        raise _explain_load_failure("the model config", section.name_or_path, exc) from None


def _no_auto_class(section: ModelSection, config) -> ModelError:
    name = AUTO_CLASSES[section.task]
    kind = {"causal_lm": "a decoder", "seq2seq": "an encoder-decoder (T5, BART)"}.get(
        section.task, "an encoder (BERT) or a decoder"
    )
    return ModelError(
        f"model.task: {section.task} needs {kind} model that transformers' {name} can build; "
        f"{config.__class__.__name__} ({getattr(config, 'model_type', '?')}) has none, so pick another task or model"
    )


def _check_task(section: ModelSection, config) -> None:
    """Refuse a task the architecture has no Auto class for, naming model.task."""
    auto = auto_class(section.task)
    remote = section.trust_remote_code and AUTO_CLASSES[section.task] in (getattr(config, "auto_map", None) or {})
    if type(config) not in auto._model_mapping and not remote:
        raise _no_auto_class(section, config)


def _size_head(section: ModelSection, config, num_labels: int | None, label_names: list[str] | None) -> None:
    """Size a classification head for the data's labels (id2label/label2id in the config)."""
    if section.task not in ("seq_cls", "token_cls"):
        return
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(f"num_labels={num_labels} but {len(label_names)} label names")
        num_labels = len(label_names)
    if num_labels is not None:
        names = list(label_names) if label_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
        config.num_labels = num_labels
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


def _set_pad_id(section: ModelSection, config, pad_token_id: int | None) -> None:
    if section.task == "seq_cls" and getattr(config, "pad_token_id", None) is None:
        # Decoder classifiers (Llama, ...) read the logits at each row's last non-pad token, found by this id.
        config.pad_token_id = pad_token_id if pad_token_id is not None else load_tokenizer(section).pad_token_id


# The class attribute by which transformers says a model supports an attention implementation.
ATTENTION_SUPPORT = {
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}


def _model_class(section: ModelSection, config):
    """The transformers class model.task builds for this config; None for remote code or an unknown config."""
    try:
        return auto_class(section.task)._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def resolve_attention(section: ModelSection, config, dtype) -> str | None:
    """The attention implementation for `model.attn_implementation`; None lets transformers choose.

    An explicit choice the model's class does not support is refused by name. auto: flash_attention_2 on a
    CUDA GPU with flash-attn installed, in a 16-bit dtype, if the class supports it; else sdpa if it does;
    else eager.
    """
    import importlib.util

    chosen = section.attn_implementation
    model_class = _model_class(section, config) if config is not None else None
    if model_class is None:
        return None if chosen == "auto" else chosen

    def supports(name: str) -> bool:
        return bool(getattr(model_class, ATTENTION_SUPPORT[name], False))

    if chosen != "auto":
        if chosen in ATTENTION_SUPPORT and not supports(chosen):
            raise ModelError(
                f"model.attn_implementation: {model_class.__name__} does not support {chosen}; use auto (which picks "
                "the best one it supports) or eager"
            )
        return chosen
    half = str(dtype if dtype != "auto" else getattr(config, "dtype", None)).removeprefix("torch.")
    if (
        torch.cuda.is_available()
        and half in ("bfloat16", "float16")
        and supports("flash_attention_2")
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa" if supports("sdpa") else "eager"


def _load_dtype(section: ModelSection):
    if section.dtype != "auto":
        return DTYPES[section.dtype]
    if is_gguf(section.name_or_path):
        return torch.float32  # GGUF is dequantized; fp32 keeps every bit it had
    return auto_dtype()


def _config_unless_gguf(section: ModelSection):
    # A GGUF file's config is parsed from the whole file's metadata: leave auto to transformers there.
    return None if is_gguf(section.name_or_path) and section.task == "causal_lm" else _load_config(section)


def planned_attention(section: ModelSection) -> str | None:
    """The attention implementation `load_base_model` will use, known from the config alone (None: transformers'
    choice), so that what depends on it (packing) is settled before the weights load."""
    return resolve_attention(section, _config_unless_gguf(section), _load_dtype(section))


def load_base_model(
    section: ModelSection,
    device_map: str | dict | None = None,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """The base model with the head of model.task, in the recipe's dtype and attention implementation.

    seq_cls/token_cls: `label_names` (or `num_labels`) size the head and fill id2label/label2id; a checkpoint
    head of another size is replaced by a freshly initialised one. seq_cls models without a pad id in their
    config get `pad_token_id` (default: the recipe tokenizer's).
    """
    check_model_path(section.name_or_path)
    source, extra = _source_kwargs(section.name_or_path)
    kwargs: dict = {"revision": section.revision, "trust_remote_code": section.trust_remote_code, **extra}
    kwargs["dtype"] = _load_dtype(section)
    # Mismatched shapes are judged by check_loaded_weights, which names them; transformers' own refusal only
    # points at a report that our quiet logging hides.
    kwargs["ignore_mismatched_sizes"] = True
    _quiet_transformers()
    config = _config_unless_gguf(section)
    kwargs["attn_implementation"] = resolve_attention(section, config, kwargs["dtype"])
    if section.task != "causal_lm":
        _check_task(section, config)
        _size_head(section, config, num_labels, label_names)
        _set_pad_id(section, config, pad_token_id)
        # The head is the task's own: a checkpoint head of another size (or none) is initialised afresh.
        kwargs["config"] = config
    if section.quantization is not None:
        from peftcli.models.quantize import bitsandbytes_config, kept_in_float

        config = config if config is not None else _load_config(section)
        with torch.device("meta"):
            empty = auto_class(section.task).from_config(config, trust_remote_code=section.trust_remote_code)
        keep = kept_in_float(empty, section.quantization)
        kwargs["quantization_config"] = bitsandbytes_config(section.quantization, keep)
        # bitsandbytes quantizes as the weights reach their device, so the model is placed while loading.
        device_map = device_map if device_map is not None else {"": default_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = auto_class(section.task).from_pretrained(source, output_loading_info=True, **kwargs)
    except Exception as exc:
        if "Unrecognized configuration class" in str(exc):
            raise _no_auto_class(section, _load_config(section)) from None
        raise _explain_load_failure("the model", section.name_or_path, exc) from None
    # (model, loading info) on every path: plain, device_map, bitsandbytes, GGUF. Remote code may return
    # the model alone if it overrides from_pretrained; it is then not checked.
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    if info is not None:
        check_loaded_weights(section.name_or_path, section.task, model, info, gguf=bool(extra))
    if extra:
        # A GGUF-loaded model keeps a GGUF quantization config that forbids saving; the weights are plain now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    if section.quantization is not None:
        from peftcli.models.quantize import prepare_quantized_model

        prepare_quantized_model(model, section.quantization)
    model.config.use_cache = False
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant), with input grads on.

    transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable during v5; either
    is used, whichever the installed version has. The frozen embedding output must carry grad into the
    checkpointed blocks, or adapters inside them get none.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each repeated block (the classes transformers keeps whole when sharding), in place.

    Compiling the blocks rather than the whole model compiles one graph that every layer reuses, keeps module
    and parameter names as they are (checkpoints, sharding and the adapter's keys are unchanged), and leaves
    the output head uncompiled for the chunked loss. Returns how many blocks were compiled.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelError(
            f"training.compile: {type(model).__name__} does not name its repeated blocks (_no_split_modules); "
            "set training.compile: false"
        )
    for block in blocks:
        block.compile()
    return len(blocks)


def default_device() -> str:
    """Where a model is placed when nobody says: this process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def build_empty_model(
    section: ModelSection, *, num_labels: int | None = None, label_names: list[str] | None = None
) -> nn.Module:
    """The model's architecture with the head of model.task on the meta device (no weights read).

    Enough to match target modules; no tokenizer is read, so a seq_cls config without a pad id keeps none.
    """
    config = _load_config(section)
    _check_task(section, config)
    _size_head(section, config, num_labels, label_names)
    _quiet_transformers()
    with torch.device("meta"):
        return auto_class(section.task).from_config(config, trust_remote_code=section.trust_remote_code)
