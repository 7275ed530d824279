"""HF TrainingArguments-style configs (YAML or JSON) -> recipe: the flat files of TRL's `trl sft --config` and the
transformers example scripts, with TRL's ModelConfig (LoRA, quantization) and SFT keys. ms-swift and Oumi, which
build on the same TrainingArguments, have importers of their own (their defaults and other keys differ).

A file with any TRL key is read with TRL's SFTConfig/ModelConfig defaults (trl/trainer/sft_config.py,
trl/trainer/model_config.py); otherwise HF TrainingArguments' own (trainer_args.py).
"""

from __future__ import annotations

from pathlib import Path

from peftcli.recipe.importers.common import Converter, finish_sources, make_source, sniff_format
from peftcli.recipe.importers.result import ConfigImportError, ImportResult
from peftcli.recipe.importers.trainer_args import HF_DEFAULTS, map_training_arguments

TOOL = "hf"
TRL_KEYS = (
    "use_peft",
    "dataset_name",
    "max_length",
    "max_seq_length",
    "packing",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "lora_r",
    "lora_target_modules",
    "load_in_4bit",
)
# SFTConfig: learning_rate 2e-5 and max_length 1024; since TRL 0.20 also gradient_checkpointing True and
# bf16 True unless fp16 is set.
TRL_DEFAULTS = {**HF_DEFAULTS, "learning_rate": 2e-5, "gradient_checkpointing": True, "precision": "bf16"}
TRL_MAX_LENGTH = 1024
# ModelConfig: lora_r 16, lora_alpha 32, lora_dropout 0.05, bnb_4bit_quant_type "nf4", use_bnb_nested_quant False
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto", "bf16": "bf16", "fp16": "fp16"}

_NO_EFFECT = {
    "lora_task_type": "peftcli takes the task from model.task",
    "dataset_num_proc": "peftcli picks its own number of preprocessing workers",
    "model_init_kwargs": "peftcli loads the model from the recipe's model section",
    "use_liger_kernel": "peftcli has its own chunked loss (training.cross_entropy)",
    "eval_packing": "peftcli evaluates unpacked rows",
    "dataset_kwargs": "peftcli prepares the data itself",
}
_NOT_SUPPORTED = {
    "chat_template_path": "peftcli renders chats with the tokenizer's own template; use a tokenizer that has it "
    "(model.tokenizer)",
    "eos_token": "peftcli uses the tokenizer's own end-of-sequence token",
    "pad_token": "peftcli uses the tokenizer's own padding token",
    "padding_free": "peftcli's packing (data.packing) is its padding-free mode",
    "packing_strategy": "peftcli packs whole examples into rows and keeps them apart",
    "datasets": "a dataset mixture; write data.train as a list of local sources",
    "dataset_test_split": "peftcli takes validation data from data.validation; set a file or a fraction",
}


def detect_score(data: dict) -> int:
    """How strongly the keys say HF TrainingArguments or TRL (0: not at all)."""
    marks = (
        "model_name_or_path",
        "per_device_train_batch_size",
        "num_train_epochs",
        "lr_scheduler_type",
        "output_dir",
        "logging_steps",
        "eval_strategy",
        "save_strategy",
        "optim",
        *TRL_KEYS,
    )
    if any(key in data for key in ("finetuning_type", "stage", "template", "base_model", "model")):
        return 0  # LLaMA-Factory, Axolotl, ms-swift and Oumi configs carry HF keys too; these keys are theirs alone
    return sum(key in data for key in marks)


def convert(path: Path, data: dict) -> ImportResult:
    """Convert a TrainingArguments/TRL config mapping into a recipe mapping."""
    conv = Converter(TOOL, path, data)
    trl = any(key in data for key in TRL_KEYS)
    _model(conv)
    _method(conv, trl)
    _data(conv, trl)
    map_training_arguments(
        conv, "TRL SFTConfig" if trl else "HF TrainingArguments", TRL_DEFAULTS if trl else HF_DEFAULTS
    )
    conv.list_unused(_NO_EFFECT, _NOT_SUPPORTED)
    return conv.finish()


def _model(conv: Converter) -> None:
    if not conv.has("model_name_or_path"):
        raise ConfigImportError(f"{conv.path}: no model_name_or_path; the config must name the model it trains")
    name = str(conv.take("model_name_or_path"))
    conv.put("model.name_or_path", conv.local_path(name) or name)
    if conv.has("model_revision") and conv.data["model_revision"] != "main":
        conv.put("model.revision", str(conv.take("model_revision")))
    conv.used.add("model_revision")
    if conv.take("trust_remote_code"):
        conv.put("model.trust_remote_code", True)
    dtype = conv.take("dtype", conv.take("torch_dtype"))
    if dtype is not None:
        if str(dtype) in DTYPES:
            conv.put("model.dtype", DTYPES[str(dtype)])
        else:
            conv.note("torch_dtype", f"{dtype}: peftcli's dtypes are auto, bf16, fp16 and fp32")
    attention = conv.take("attn_implementation")
    if conv.take("use_flash_attention_2"):
        attention = "flash_attention_2"
    if attention:
        if attention in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
            conv.put("model.attn_implementation", attention)
        else:
            conv.note(
                "attn_implementation",
                f"{attention}: peftcli takes auto, sdpa, eager, flash_attention_2 or flex_attention",
            )
    four, eight = conv.take("load_in_4bit", False), conv.take("load_in_8bit", False)
    if four:
        conv.put(
            "model.quantization",
            {
                "bits": 4,
                "quant_type": conv.take("bnb_4bit_quant_type", "nf4"),
                "double_quant": bool(conv.take("use_bnb_nested_quant", False)),  # ModelConfig: off by default
            },
        )
    elif eight:
        conv.put("model.quantization", {"bits": 8})
    conv.used.update({"bnb_4bit_quant_type", "use_bnb_nested_quant"})


def _method(conv: Converter, trl: bool) -> None:
    lora_keys = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_modules_to_save",
        "use_rslora",
        "use_dora",
    )
    if not conv.take("use_peft", False):
        conv.put("method", {"name": "full"})
        for key in lora_keys:
            if conv.has(key):
                conv.note(key, "use_peft is not set, so the source fine-tunes the whole model and ignores it")
            conv.used.add(key)
        return
    conv.put("method.name", "lora")
    conv.copy("lora_r", "method.r", LORA_R, "TRL ModelConfig's lora_r default")
    conv.copy("lora_alpha", "method.alpha", LORA_ALPHA, "TRL ModelConfig's lora_alpha default")
    conv.copy("lora_dropout", "method.dropout", LORA_DROPOUT, "TRL ModelConfig's lora_dropout default")
    targets = conv.take("lora_target_modules")
    if targets:
        names = [targets] if isinstance(targets, str) else list(targets)
        conv.put("method.target_modules", "all-linear" if names == ["all-linear"] else names)
    else:
        conv.note(
            "lora_target_modules",
            "unset: HF PEFT picks per architecture (q_proj and v_proj for Llama-style "
            "models); the recipe keeps peftcli's all-linear, so set method.target_modules",
        )
    if conv.has("lora_modules_to_save"):
        conv.put("method.modules_to_save", list(conv.take("lora_modules_to_save")))
    if conv.take("use_rslora"):
        conv.put("method.rslora", True)
    if conv.take("use_dora"):
        conv.put("method.dora", True)


def _source(conv: Converter, key: str, name: str, text_field: str) -> dict:
    """A data source for a dataset path or name, its format read from the first record of a local file."""
    found = conv.local_path(name)
    sniffed = sniff_format(found) if found else None
    if sniffed:
        fmt, columns = sniffed
    else:
        fmt, columns = "chat", {}
        conv.note(
            f"{key} (format)",
            f"{name}: the format could not be read from the data; written as chat "
            "(TRL's conversational format), change the format if it is not",
        )
    if fmt == "text" and text_field != "text":
        columns = {"text": text_field}
    return make_source(conv, key, name, fmt, columns)


def _data(conv: Converter, trl: bool) -> None:
    text_field = str(conv.take("dataset_text_field", "text"))
    if conv.has("dataset_name"):
        source = _source(conv, "dataset_name", str(conv.take("dataset_name")), text_field)
        split = conv.take("dataset_train_split", "train")
        if split != "train":
            source["split"] = str(split)
        if conv.has("dataset_config"):
            source["subset"] = str(conv.take("dataset_config"))
        conv.sources.append(source)
    if conv.has("train_file"):  # transformers' example scripts (run_clm.py)
        conv.sources.append(_source(conv, "train_file", str(conv.take("train_file")), text_field))
    conv.used.update({"dataset_train_split", "dataset_config"})
    finish_sources(conv)
    if conv.has("validation_file"):
        conv.put("data.validation", _source(conv, "validation_file", str(conv.take("validation_file")), text_field))
    if conv.has("max_length") or conv.has("max_seq_length"):
        conv.put("data.max_length", int(conv.take("max_length") or conv.take("max_seq_length")))
    elif trl:
        conv.copy("max_length", "data.max_length", TRL_MAX_LENGTH, "TRL SFTConfig's max_length default")
    conv.used.update({"max_length", "max_seq_length"})
    conv.put("data.packing", bool(conv.take("packing", False)))
    if not conv.has("packing"):
        owner = "TRL SFTConfig's packing default" if trl else "the HF Trainer packs nothing"
        conv.defaults.append(("data.packing", False, owner))
    _loss_mask(conv, trl)


def _loss_mask(conv: Converter, trl: bool) -> None:
    """Which tokens the source's loss covers, as data.mask_prompt."""
    if not trl:
        # the plain HF Trainer's causal-LM loss covers every token it is given
        conv.put("data.mask_prompt", False)
        conv.defaults.append(("data.mask_prompt", False, "the HF Trainer masks no prompt tokens"))
        return
    train = conv.recipe["data"]["train"]
    fmt = (train[0] if isinstance(train, list) else train)["format"]
    if fmt == "chat":
        # TRL trains on every token of a conversation unless assistant_only_loss is set
        conv.copy(
            "assistant_only_loss",
            "data.mask_prompt",
            False,
            "TRL SFTConfig's assistant_only_loss default",
            convert=bool,
        )
        conv.no_effect("completion_only_loss", "the data is conversational; assistant_only_loss decides")
    else:
        # TRL's completion_only_loss None means: completion only for prompt-completion data
        only = conv.take("completion_only_loss")
        conv.put("data.mask_prompt", True if only is None else bool(only))
        conv.no_effect("assistant_only_loss", "the data is not conversational; completion_only_loss decides")
