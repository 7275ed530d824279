"""ms-swift (`swift sft --config FILE`, or its command-line flags written as YAML) -> recipe.

ms-swift's own keys (model, tuner_type, lora_rank, dataset, max_length, ...) sit on top of HF TrainingArguments,
several of whose defaults it changes. Names and defaults were checked against modelscope/ms-swift at 3602360
(2026-08-22, 4.6.0.dev0): swift/arguments/ and swift/trainers/arguments.py. ms-swift 3.x (swift/llm/argument/)
has the same keys and defaults, except that it calls tuner_type `train_type`; both are read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peftcli.recipe.importers.common import Converter
from peftcli.recipe.importers.ms_swift_data import DTYPES, map_data, name_list
from peftcli.recipe.importers.result import ConfigImportError, ImportResult
from peftcli.recipe.importers.trainer_args import HF_DEFAULTS, map_training_arguments

TOOL = "ms-swift"
# arguments/base_args/base_args.py: tuner_type 'lora' (3.x: train_type), packing False
TUNER_TYPE = "lora"
# arguments/tuner_args.py: lora_rank 8, lora_alpha 32, lora_dropout 0.05, target_modules ['all-linear'],
# init_weights 'true', lora_bias 'none'
LORA_RANK = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
# arguments/sft_args.py (_init_override): learning_rate None becomes 1e-5 for full training, else 1e-4
LEARNING_RATE = {"full": 1e-5, "lora": 1e-4}
# trainers/arguments.py (TrainArgumentsMixin): per_device_train_batch_size 1, gradient_accumulation_steps None,
# which becomes ceil(16 / per_device_train_batch_size / processes), gradient_checkpointing True, weight_decay 0.1,
# adam_beta2 0.95, lr_scheduler_type 'cosine'
BATCH_SIZE = 1
GLOBAL_BATCH = 16
WEIGHT_DECAY = 0.1
ADAM_BETA2 = 0.95
# arguments/base_args/quant_args.py: bnb_4bit_quant_type 'nf4', bnb_4bit_use_double_quant True,
# bnb_4bit_compute_dtype None (the model's torch_dtype)
BNB_QUANT_TYPE = "nf4"
BNB_DOUBLE_QUANT = True
# arguments/sft_args.py (_init_deepspeed): these names pick swift/config/NAME.json, whose ZeRO stage and offload
# are written here (zero_optimization.stage and the offload devices that are not "none")
DEEPSPEED_BUILTIN = {
    "zero0": (0, ()),
    "zero1": (1, ()),
    "zero2": (2, ()),
    "zero2_offload": (2, ("offload_optimizer",)),
    "zero3": (3, ()),
    "zero3_offload": (3, ("offload_optimizer", "offload_param")),
}
# arguments/base_args/model_args.py (_init_mixed_precision): bf16 mixed precision for a bf16 model, fp16 otherwise
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp16"}
ATTENTION = {
    "flash_attn": "flash_attention_2",
    "flash_attention_2": "flash_attention_2",
    "sdpa": "sdpa",
    "eager": "eager",
    "flex_attention": "flex_attention",
}

_NO_EFFECT = {
    "model_type": "transformers' Auto classes pick the model class",
    "tuner_backend": "peftcli applies its own adapters",
    "template_backend": "peftcli renders chats with the tokenizer's own template",
    "dataset_num_proc": "peftcli picks its own number of preprocessing workers",
    "load_from_cache_file": "peftcli's tokenized-data cache is keyed by the data and the recipe",
    "lazy_tokenize": "peftcli tokenizes ahead of training",
    "dataset_shuffle": "peftcli shuffles the training rows every epoch",
    "train_dataloader_shuffle": "peftcli shuffles the training rows every epoch",
    "val_dataset_shuffle": "peftcli evaluates the validation rows in order",
    "check_model": "peftcli does not hash the model files",
    "acc_strategy": "peftcli reports loss and perplexity",
    "use_logits_to_keep": "peftcli has its own chunked loss (training.cross_entropy)",
    "use_liger_kernel": "peftcli has its own chunked loss (training.cross_entropy)",
    "create_checkpoint_symlink": "peftcli's run directory has a fixed layout",
    "hub_token": "peftcli does not upload",
    "ddp_backend": "set by peftcli's launcher",
    "padding_side": "peftcli pads on the right for training",
    "max_new_tokens": "generation only",
    "temperature": "generation only",
    "response_prefix": "inference only",
    "enable_thinking": "inference only",
    "dataloader_prefetch_factor": "peftcli uses no data-loader workers",
    "device_map": "peftcli places the model itself (one process per GPU)",
    "max_memory": "peftcli places the model itself (one process per GPU)",
    "load_args": "peftcli reads no args.json",
    "use_chat_template": "peftcli renders through the tokenizer's chat template when it has one",
}
_NOT_SUPPORTED = {
    "model_kwargs": "peftcli passes no extra model options",
    "new_special_tokens": "peftcli cannot add tokens to the tokenizer",
    "rope_scaling": "peftcli uses the model's own rope settings",
    "max_model_len": "peftcli uses the model's own rope settings",
    "adapters": "to continue a peftcli run, set model.adapter to its run directory",
    "resume_only_model": "resume with `peft train RECIPE --resume`",
    "external_plugins": "a recipe never runs code; peftcli has no plugins",
    "custom_register_path": "a recipe never runs code; peftcli has no plugins",
    "custom_dataset_info": "peftcli reads data files directly; name them in data.train",
    "cached_dataset": "pre-tokenized ms-swift data; give peftcli the raw data",
    "cached_val_dataset": "pre-tokenized ms-swift data; give peftcli the raw data",
    "streaming": "peftcli reads the whole dataset",
    "interleave_prob": "set data.train[].weight for a mix",
    "stopping_strategy": "set data.train[].weight for a mix",
    "lora_dtype": "peftcli keeps adapter weights in fp32",
    "lora_bias": "peftcli trains no bias",
    "freeze_parameters": "no parameter-name freezing in peftcli; see method.modules_to_save",
    "freeze_parameters_regex": "no parameter-name freezing in peftcli; see method.modules_to_save",
    "freeze_parameters_ratio": "no parameter-name freezing in peftcli; see method.modules_to_save",
    "trainable_parameters": "no parameter-name unfreezing in peftcli; see method.modules_to_save",
    "trainable_parameters_regex": "no parameter-name unfreezing in peftcli; see method.modules_to_save",
    "freeze_llm": "multimodal models only",
    "freeze_vit": "multimodal models only",
    "freeze_aligner": "multimodal models only",
    "vit_lr": "multimodal models only",
    "aligner_lr": "multimodal models only",
    "vit_gradient_checkpointing": "multimodal models only",
    "max_pixels": "multimodal models only",
    "agent_template": "peftcli renders tool calls with the tokenizer's own chat template",
    "sequence_parallel_size": "peftcli has no sequence parallelism",
    "early_stop_interval": "peftcli has no early stopping",
    "loss_type": "peftcli's SFT loss is token cross-entropy",
    "enable_dft_loss": "peftcli's SFT loss is token cross-entropy",
    "enable_channel_loss": "peftcli's SFT loss is token cross-entropy",
    "eval_dataset": "EvalScope benchmarks during training; peftcli evaluates data.validation",
    "eval_use_evalscope": "EvalScope benchmarks during training; peftcli evaluates data.validation",
    "predict_with_generate": "see training.eval_generation for generation scores",
    "use_galore": "peftcli has no GaLore",
    "lisa_activated_layers": "peftcli has no LISA",
    "deepspeed_autotp_size": "peftcli has no tensor parallelism",
    "zero_hpz_partition_size": "not part of peftcli's DeepSpeed presets",
    "swanlab_project": "peftcli reports to tensorboard, mlflow and wandb",
    "packing_length": "peftcli packs rows of up to data.max_length tokens",
    "packing_strategy": "peftcli packs whole examples into rows and keeps them apart",
    "padding_free": "peftcli's packing (data.packing) is its padding-free mode",
}


def detect_score(data: dict) -> int:
    """How strongly the keys say ms-swift (0: not at all)."""
    if not isinstance(data.get("model"), str):
        return 0  # ms-swift names its model with `model`; Oumi's `model` is a section
    marks = (
        "tuner_type",
        "train_type",
        "lora_rank",
        "target_modules",
        "split_dataset_ratio",
        "val_dataset",
        "attn_impl",
        "quant_method",
        "quant_bits",
        "loss_scale",
        "model_author",
        "system",
        "torch_dtype",
        "init_weights",
        "lorap_lr_ratio",
        "truncation_strategy",
        "dataset_num_proc",
        "use_hf",
    )
    return 2 + sum(key in data for key in marks)


def convert(path: Path, data: dict) -> ImportResult:
    """Convert an ms-swift config mapping into a recipe mapping."""
    conv = Converter(TOOL, path, data)
    if conv.has("rlhf_type"):
        raise ConfigImportError(
            f"{path}: rlhf_type {data['rlhf_type']}: only supervised fine-tuning (swift sft) is imported"
        )
    task = conv.take("task_type", "causal_lm")
    if task != "causal_lm":
        raise ConfigImportError(f"{path}: task_type {task}: only causal_lm (language-model SFT) is imported")
    tuner = _tuner_type(conv)
    _model(conv)
    _method(conv, tuner)
    map_data(conv)
    _training(conv, tuner)
    conv.list_unused(_NO_EFFECT, _NOT_SUPPORTED)
    return conv.finish()


def _tuner_type(conv: Converter) -> str:
    key = "tuner_type" if conv.has("tuner_type") else "train_type"
    tuner = str(conv.take(key, TUNER_TYPE))
    conv.used.update({"tuner_type", "train_type"})
    if conv.has("tuner_type") and conv.has("train_type"):
        conv.note("train_type", "ms-swift 3.x's name for tuner_type, which is also set and wins")
    if tuner not in ("lora", "full"):
        raise ConfigImportError(f"{conv.path}: {key} {tuner}: only lora and full are imported")
    return tuner


def _model(conv: Converter) -> None:
    name = conv.take("model")
    if not isinstance(name, str) or not name:
        raise ConfigImportError(f"{conv.path}: no model; an ms-swift config names the model it trains")
    local = conv.local_path(name)
    conv.put("model.name_or_path", local or name)
    hf_hub = bool(conv.take("use_hf", False))
    if not local and not hf_hub:
        conv.note(
            "model",
            f"{name}: ms-swift downloads it from ModelScope (use_hf is off); peftcli reads the Hugging Face hub, "
            "where the same id usually names the same model: check it, or point model.name_or_path at a local copy",
        )
    conv.note(
        "model (remote code)",
        "ms-swift loads every model with trust_remote_code on (swift/model/register.py); peftcli runs a model "
        "repository's own code only with model.trust_remote_code: true, so set it if this model needs it",
    )
    if conv.has("model_revision"):
        conv.put("model.revision", str(conv.take("model_revision")))
    dtype = conv.take("torch_dtype")
    if dtype is not None:
        if str(dtype) in DTYPES:
            conv.put("model.dtype", DTYPES[str(dtype)])
        else:
            conv.note("torch_dtype", f"{dtype}: peftcli's dtypes are auto, bf16, fp16 and fp32")
    attention = conv.take("attn_impl")
    if attention:
        if attention in ATTENTION:
            conv.put("model.attn_implementation", ATTENTION[attention])
        else:
            conv.note("attn_impl", f"{attention}: peftcli takes sdpa, eager, flash_attention_2 or flex_attention")
    _quantization(conv)


def _quantization(conv: Converter) -> None:
    method, bits = conv.take("quant_method"), conv.take("quant_bits")
    conv.used.update(
        {"bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"}
    )
    if method is None:
        if bits is not None:
            conv.note("quant_bits", "no quant_method, so ms-swift quantizes nothing on load")
        return
    if method != "bnb" or bits not in (4, 8):
        conv.note("quant_method", f"{method} {bits}-bit: peftcli quantizes with bitsandbytes to 4 or 8 bits only")
        return
    if bits == 8:
        conv.put("model.quantization", {"bits": 8})
        return
    compute = conv.take("bnb_4bit_compute_dtype") or conv.data.get("torch_dtype")
    quant: dict[str, Any] = {
        "bits": 4,
        "quant_type": str(conv.take("bnb_4bit_quant_type", BNB_QUANT_TYPE)),
        "double_quant": bool(conv.take("bnb_4bit_use_double_quant", BNB_DOUBLE_QUANT)),
    }
    if str(compute) in DTYPES:
        quant["compute_dtype"] = DTYPES[str(compute)]
    storage = conv.take("bnb_4bit_quant_storage")
    if storage is not None:
        if str(storage) in DTYPES or storage == "uint8":
            quant["storage_dtype"] = DTYPES.get(str(storage), "uint8")
        else:
            conv.note("bnb_4bit_quant_storage", f"{storage}: peftcli stores 4-bit weights as uint8, bf16, fp16 or fp32")
    conv.put("model.quantization", quant)


def _method(conv: Converter, tuner: str) -> None:
    lora_keys = (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "target_regex",
        "target_parameters",
        "modules_to_save",
        "use_dora",
        "use_rslora",
        "lorap_lr_ratio",
        "init_weights",
    )
    if tuner == "full":
        conv.put("method", {"name": "full"})
        for key in lora_keys:
            if conv.has(key):
                conv.note(key, "tuner_type full trains the whole model, so LoRA options do not apply")
            conv.used.add(key)
        return
    conv.put("method.name", "lora")
    conv.copy("lora_rank", "method.r", LORA_RANK, "ms-swift's lora_rank default")
    conv.copy("lora_alpha", "method.alpha", LORA_ALPHA, "ms-swift's lora_alpha default")
    conv.copy("lora_dropout", "method.dropout", LORA_DROPOUT, "ms-swift's lora_dropout default", convert=float)
    _targets(conv)
    if conv.has("target_parameters"):
        conv.put("method.target_parameters", name_list(conv.take("target_parameters")))
    saved = name_list(conv.take("modules_to_save"))
    special = [name for name in saved if name in ("all-embedding", "all-norm")]
    if special:
        conv.note(
            "modules_to_save",
            f"{', '.join(special)}: ms-swift finds every embedding/norm layer; name them in method.modules_to_save",
        )
    if [name for name in saved if name not in special]:
        conv.put("method.modules_to_save", [name for name in saved if name not in special])
    if conv.take("use_dora"):
        conv.put("method.dora", True)
    if conv.take("use_rslora"):
        conv.put("method.rslora", True)
    if conv.has("lorap_lr_ratio"):
        conv.put("method.loraplus_lr_ratio", float(conv.take("lorap_lr_ratio")))
    init = str(conv.take("init_weights", "true")).lower()
    if init in ("gaussian", "pissa", "olora") or init.startswith("pissa_niter_"):
        conv.put("method.init", init)
    elif init != "true":
        conv.note("init_weights", f"{init}: peftcli's inits are default, gaussian, pissa, pissa_niter_N and olora")


def _targets(conv: Converter) -> None:
    if conv.has("target_regex"):  # arguments/tuner_args.py: a regex replaces target_modules
        conv.put("method.target_modules", str(conv.take("target_regex")))
        if conv.has("target_modules"):
            conv.note("target_modules", "target_regex is set and replaces it, as in ms-swift")
        conv.used.add("target_modules")
        return
    names = name_list(conv.take("target_modules", ["all-linear"]))
    if not conv.has("target_modules"):
        conv.defaults.append(("method.target_modules", "all-linear", "ms-swift's target_modules default"))
    if "all-embedding" in names:
        conv.note("target_modules", "all-embedding: ms-swift finds the embedding layers; name them in the list")
        names = [name for name in names if name != "all-embedding"]
    if names == ["all-linear"]:
        conv.put("method.target_modules", "all-linear")
    elif "all-linear" in names:
        conv.put("method.target_modules", "all-linear")
        conv.note(
            "target_modules",
            f"{', '.join(n for n in names if n != 'all-linear')}: besides all-linear; peftcli takes all-linear or a "
            "list, so list every module (peft targets RECIPE shows what all-linear matches)",
        )
    elif names:
        conv.put("method.target_modules", names)


def _training(conv: Converter, tuner: str) -> None:
    batch = conv.data.get("per_device_train_batch_size") or BATCH_SIZE
    save_strategy = conv.data.get("save_strategy") or "steps"
    dtype = DTYPES.get(str(conv.data.get("torch_dtype")))
    defaults = {
        **HF_DEFAULTS,
        "learning_rate": LEARNING_RATE[tuner],
        "per_device_train_batch_size": BATCH_SIZE,
        "gradient_accumulation_steps": max(1, math.ceil(GLOBAL_BATCH / int(batch))),
        "lr_scheduler_type": "cosine",
        "weight_decay": WEIGHT_DECAY,
        "adam_beta2": ADAM_BETA2,
        "gradient_checkpointing": True,
        "precision": MIXED_PRECISION.get(dtype or "", "auto"),
        "output_dir": f"output/{str(conv.data.get('model', '')).rstrip('/').rsplit('/', 1)[-1]}",
        "eval_strategy": save_strategy,  # sft_args.py _init_eval_strategy: evaluation follows saving
        "eval_steps": conv.data.get("save_steps") or HF_DEFAULTS["save_steps"],
    }
    reasons = {
        "learning_rate": f"ms-swift's learning_rate default for tuner_type {tuner}",
        "gradient_accumulation_steps": "ms-swift's default: ceil(16 / per_device_train_batch_size / processes), "
        "here for one process",
        "bf16/fp16": "ms-swift's mixed precision follows torch_dtype: bf16 for bfloat16, else fp16",
        "output_dir": "ms-swift's output_dir default: output/<model name>",
        "eval_steps": "ms-swift evaluates every save_steps unless eval_steps is set",
    }
    if dtype is None and not (conv.has("bf16") or conv.has("fp16")):
        conv.note(
            "torch_dtype",
            "unset: ms-swift takes the dtype from the model's config.json and trains in bf16 mixed precision for "
            "a bf16 model, else fp16; the recipe keeps auto (bf16 where supported)",
        )
    conv.deepspeed_builtin = {
        name: ({"zero_optimization": {"stage": stage, **{part: {"device": "cpu"} for part in offload}}}, name)
        for name, (stage, offload) in DEEPSPEED_BUILTIN.items()
    }
    map_training_arguments(conv, "ms-swift", defaults, reasons)
    if dtype is None:  # no source value to state: the note above says what ms-swift does
        conv.defaults = [d for d in conv.defaults if d[0] != "training.precision"]
    if conv.has("max_epochs"):  # trainers/arguments.py: max_epochs overrides num_train_epochs
        if conv.get("training.max_steps") is None:
            conv.put("training.epochs", float(conv.take("max_epochs")))
            conv.defaults = [d for d in conv.defaults if d[0] != "training.epochs"]
        if conv.has("num_train_epochs"):
            conv.note("num_train_epochs", "max_epochs is set and replaces it, as in ms-swift")
    conv.used.add("max_epochs")
    if not conv.has("gradient_accumulation_steps"):
        conv.note(
            "gradient_accumulation_steps",
            "unset: ms-swift aims at 16 examples per step over all processes; the recipe's value is for one process, "
            "divide it by the number of processes",
        )
    if conv.data.get("add_version", True) is not False:
        conv.note(
            "add_version",
            "ms-swift's default true: each run goes into a new versioned subdirectory (v0-<date>-<time>) of "
            "output_dir; peftcli writes output.dir itself",
        )
    conv.used.add("add_version")
