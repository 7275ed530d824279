"""LLaMA-Factory YAML -> recipe.

Defaults come from LLaMA-Factory's argument dataclasses (src/llamafactory/hparams/{model,data,finetuning}_args.py);
its training keys are HF TrainingArguments (see trainer_args.py). Datasets are names looked up in
`dataset_dir/dataset_info.json`, as LLaMA-Factory does.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftcli.recipe.importers.common import Converter, chat_columns, finish_sources, make_source
from peftcli.recipe.importers.result import ConfigImportError, ImportResult
from peftcli.recipe.importers.trainer_args import HF_DEFAULTS, map_training_arguments

TOOL = "llama-factory"
# Checked against hiyouga/LLaMA-Factory at ff6d4d1 (2026-08-18); paths are under src/llamafactory/.
# hparams/finetuning_args.py: lora_rank 8, lora_alpha None (__post_init__: lora_rank * 2), lora_dropout 0.0,
# lora_target "all", pissa_iter 16
LORA_RANK = 8
LORA_DROPOUT = 0.0
# hparams/data_args.py: cutoff_len 2048, train_on_prompt False, val_size 0.0, dataset_dir "data"; packing None,
# which hparams/parser.py turns into `stage == "pt"`
CUTOFF_LEN = 2048
TRAIN_ON_PROMPT = False
DATASET_DIR = "data"
# hparams/model_args.py: quantization_method bnb, quantization_type "nf4", double_quantization True;
# disable_gradient_checkpointing False, so LLaMA-Factory checkpoints activations unless told not to.
QUANTIZATION_TYPE = "nf4"
DOUBLE_QUANTIZATION = True
# data/README.md: alpaca columns prompt/query/response; sharegpt columns messages "conversations" with tags
# from/value and roles human/gpt.
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
# dataset_info.json entry keys the importer reads (file_sha1 only guards LLaMA-Factory's cache)
_INFO_KEYS = {"file_name", "hf_hub_url", "formatting", "columns", "tags", "split", "subset", "ranking", "file_sha1"}
# extras/constants.py AttentionFunction: auto, disabled, sdpa, fa2, fa3 (no FlashAttention-3 in peftcli)
ATTENTION = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}

_NO_EFFECT = {
    "overwrite_cache": "peftcli's tokenized-data cache is keyed by the data and the recipe",
    "preprocessing_num_workers": "peftcli picks its own number of preprocessing workers",
    "enable_liger_kernel": "peftcli has its own chunked loss (training.cross_entropy)",
    "create_new_adapter": "peftcli always builds a new adapter unless model.adapter is set",
    "cache_dir": "peftcli uses the Hugging Face cache",
    "infer_backend": "inference only",
    "export_dir": "export with `peft export` after training",
}
_NOT_SUPPORTED = {
    "adapter_name_or_path": "to continue a peftcli run, set model.adapter to its run directory",
    "rope_scaling": "peftcli uses the model's own rope settings",
    "use_unsloth": "peftcli has no Unsloth kernels",
    "mask_history": "peftcli trains on every assistant turn",
    "tokenized_path": "peftcli caches tokenized data itself",
    "streaming": "peftcli reads the whole dataset",
    "mix_strategy": "peftcli concatenates the sources; set data.train[].weight for a mix",
    "interleave_probs": "set data.train[].weight instead",
    "loraplus_lr_embedding": "an absolute learning rate in LLaMA-Factory; peftcli's is a multiple of "
    "training.learning_rate: set method.loraplus_lr_embedding to their ratio",
    "pissa_convert": "peftcli always saves PiSSA adapters as plain LoRA that fits the original base",
    "new_special_tokens": "peftcli cannot add tokens to the tokenizer",
}


def detect_score(data: dict) -> int:
    """How strongly the keys say LLaMA-Factory (0: not at all)."""
    if "model" in data or "tuner_type" in data or "train_type" in data:
        return 0  # ms-swift's and Oumi's keys (LLaMA-Factory names its model model_name_or_path)
    marks = (
        "finetuning_type",
        "stage",
        "lora_target",
        "cutoff_len",
        "template",
        "quantization_bit",
        "dataset_dir",
        "lora_rank",
        "train_on_prompt",
        "val_size",
        "flash_attn",
        "additional_target",
        "plot_loss",
    )
    return sum(key in data for key in marks) + (2 if "finetuning_type" in data and "template" in data else 0)


def convert(path: Path, data: dict) -> ImportResult:
    """Convert a LLaMA-Factory config mapping into a recipe mapping."""
    conv = Converter(TOOL, path, data)
    stage = conv.take("stage", "sft")
    if stage != "sft":
        raise ConfigImportError(f"{path}: stage {stage}: only supervised fine-tuning (stage sft) is imported")
    _model(conv)
    _method(conv)
    _data(conv)
    disabled = bool(conv.take("disable_gradient_checkpointing", False))
    defaults = {**HF_DEFAULTS, "gradient_checkpointing": not disabled}
    map_training_arguments(conv, "LLaMA-Factory (HF TrainingArguments)", defaults)
    conv.list_unused(_NO_EFFECT, _NOT_SUPPORTED)
    return conv.finish()


def _model(conv: Converter) -> None:
    if not conv.has("model_name_or_path"):
        raise ConfigImportError(f"{conv.path}: no model_name_or_path; a LLaMA-Factory config names its model")
    name = str(conv.take("model_name_or_path"))
    conv.put("model.name_or_path", conv.local_path(name) or name)
    if conv.take("trust_remote_code"):
        conv.put("model.trust_remote_code", True)
    bits = conv.take("quantization_bit")
    method = conv.take("quantization_method", "bnb")
    if bits is not None:
        if method != "bnb" or bits not in (4, 8):
            conv.note(
                "quantization_bit",
                f"{bits}-bit {method}: peftcli quantizes with bitsandbytes to 4 or 8 bits "
                "only; the base is left unquantized",
            )
        elif bits == 4:
            conv.put(
                "model.quantization",
                {
                    "bits": 4,
                    "quant_type": conv.take("quantization_type", QUANTIZATION_TYPE),
                    "double_quant": bool(conv.take("double_quantization", DOUBLE_QUANTIZATION)),
                },
            )
        else:
            conv.put("model.quantization", {"bits": 8})
    conv.used.update({"quantization_type", "double_quantization", "quantization_method"})
    attention = str(conv.take("flash_attn", "auto"))
    if attention in ATTENTION:
        conv.put("model.attn_implementation", ATTENTION[attention])
    else:
        conv.note("flash_attn", f"{attention}: peftcli's attention choices are auto, sdpa, eager and flash_attention_2")
    template = conv.take("template")
    if template:
        conv.note(
            "template",
            f"{template}: peftcli renders chats and instructions with the tokenizer's own chat "
            "template (or plain text when it has none), not LLaMA-Factory's named templates",
        )


def _method(conv: Converter) -> None:
    kind = conv.take("finetuning_type", "lora")
    if kind == "full":
        conv.put("method", {"name": "full"})
        return
    if kind != "lora":
        raise ConfigImportError(f"{conv.path}: finetuning_type {kind}: only lora and full are imported")
    conv.put("method.name", "lora")
    rank = conv.copy("lora_rank", "method.r", LORA_RANK, "LLaMA-Factory's lora_rank default")
    conv.copy("lora_alpha", "method.alpha", rank * 2, "LLaMA-Factory's lora_alpha default: lora_rank * 2")
    conv.copy("lora_dropout", "method.dropout", LORA_DROPOUT, "LLaMA-Factory's lora_dropout default")
    target = conv.take("lora_target", "all")
    names = [t.strip() for t in str(target).split(",") if t.strip()] if isinstance(target, str) else list(target)
    conv.put("method.target_modules", "all-linear" if names == ["all"] else names)
    if not conv.has("lora_target"):
        conv.defaults.append(("method.target_modules", "all-linear", "LLaMA-Factory's lora_target default: all"))
    extra = conv.take("additional_target")
    if extra:
        conv.put("method.modules_to_save", [t.strip() for t in str(extra).split(",") if t.strip()])
    if conv.take("use_dora"):
        conv.put("method.dora", True)
    if conv.take("use_rslora"):
        conv.put("method.rslora", True)
    if conv.has("loraplus_lr_ratio"):
        conv.put("method.loraplus_lr_ratio", float(conv.take("loraplus_lr_ratio")))
    if conv.take("pissa_init"):
        steps = int(conv.take("pissa_iter", 16))
        conv.put("method.init", "pissa" if steps < 0 else f"pissa_niter_{steps}")
    conv.used.add("pissa_iter")


def _dataset_info(conv: Converter) -> tuple[dict, Path | None]:
    directory = str(conv.take("dataset_dir", DATASET_DIR))
    found = conv.local_path(directory)
    info_file = Path(found) / "dataset_info.json" if found else None
    if info_file is None or not info_file.is_file():
        return {}, Path(found) if found else None
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigImportError(f"{info_file}: not readable JSON ({exc})") from None
    return (info if isinstance(info, dict) else {}), Path(found)


def _source(conv: Converter, key: str, name: str, info: dict, directory: Path | None) -> dict | None:
    """The dataset `name` of dataset_info.json as a peftcli source, or None with a note."""
    entry = info.get(name)
    if not isinstance(entry, dict):
        where = f"{directory}/dataset_info.json" if directory else "no dataset_info.json found (dataset_dir)"
        conv.note(key, f"{name}: not described in {where}; add it there or write data.train by hand")
        return None
    if entry.get("ranking"):
        conv.note(key, f"{name}: a preference (ranking) dataset; only supervised data is imported")
        return None
    columns = entry.get("columns") or {}
    if entry.get("formatting", "alpaca") == "sharegpt":
        tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})}
        names = {
            "role": tags["role_tag"],
            "content": tags["content_tag"],
            "user": tags["user_tag"],
            "assistant": tags["assistant_tag"],
        }
        fmt, mapped = "chat", chat_columns(conv, key, columns.get("messages", "conversations"), names)
        if mapped is None:
            return None
    else:
        fmt = "alpaca"
        pairs = (("prompt", "instruction"), ("query", "input"), ("response", "output"))
        mapped = {ours: columns[theirs] for theirs, ours in pairs if columns.get(theirs, ours) != ours}
    ignored = sorted(set(columns) - {"prompt", "query", "response", "messages"})
    if ignored:
        conv.note(key, f"{name}: columns {', '.join(ignored)} have no place in peftcli's {fmt} format")
    extra = sorted(set(entry) - _INFO_KEYS)
    if extra:
        conv.note(f"{key} (dataset_info)", f"{name}: {', '.join(extra)} not carried (peftcli reads the whole file)")
    if entry.get("file_name"):
        path = str(directory / entry["file_name"]) if directory else str(entry["file_name"])
    elif entry.get("hf_hub_url"):
        path = str(entry["hf_hub_url"])
    else:
        conv.note(key, f"{name}: neither file_name nor hf_hub_url in dataset_info.json")
        return None
    return make_source(
        conv,
        key,
        path,
        fmt,
        mapped,
        split=entry.get("split") if entry.get("split") != "train" else None,
        subset=entry.get("subset"),
    )


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return [str(n) for n in value or []]


def _data(conv: Converter) -> None:
    info, directory = _dataset_info(conv)
    limit = conv.take("max_samples")
    for index, name in enumerate(_names(conv.take("dataset"))):
        source = _source(conv, f"dataset[{index}]", name, info, directory)
        if source:
            if limit:
                source["max_samples"] = int(limit)
            conv.sources.append(source)
    finish_sources(conv)
    evals = _names(conv.take("eval_dataset"))
    if evals:
        source = _source(conv, "eval_dataset[0]", evals[0], info, directory)
        if source:
            conv.put("data.validation", source)
        if len(evals) > 1:
            conv.note("eval_dataset", "peftcli validates on one data source; only the first was kept")
        conv.used.add("val_size")
    else:
        size = conv.take("val_size", 0)
        if size and 0 < float(size) < 1:
            conv.put("data.validation", {"fraction": float(size)})
        elif size:
            conv.note("val_size", f"{size}: peftcli holds out a fraction (0-1), not a count; set data.validation")
    conv.copy("cutoff_len", "data.max_length", CUTOFF_LEN, "LLaMA-Factory's cutoff_len default")
    conv.copy(
        "train_on_prompt",
        "data.mask_prompt",
        not TRAIN_ON_PROMPT,
        "LLaMA-Factory's train_on_prompt default, false",
        convert=lambda v: not v,
    )
    packing, neat = conv.take("packing"), conv.take("neat_packing")
    conv.put("data.packing", bool(packing or neat))
    if packing is None and not neat:
        conv.defaults.append(("data.packing", False, "LLaMA-Factory packs only in stage pt unless packing is set"))
    if packing and not neat:
        conv.note(
            "packing",
            "LLaMA-Factory's plain packing lets packed examples attend to each other; peftcli's "
            "packing keeps them apart (as neat_packing does)",
        )
