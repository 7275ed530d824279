"""Oumi training config (`oumi train -c FILE`) -> recipe.

Oumi's config is nested (model, data, training, peft, fsdp, deepspeed sections). It is read flattened, so every
key is named by its dotted path (training.learning_rate, peft.lora_r) in the unmapped-key list; free-form
mappings (model_kwargs, collator_kwargs, ...) stay whole. Names and defaults were checked against oumi-ai/oumi at
d8ed077 (2026-08-21): src/oumi/core/configs/params/*.py, and the way src/oumi/core/configs/params/training_params.py
(to_hf) hands them to the HF/TRL trainers, which passes Oumi's own values, not the trainers' defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from peftcli.recipe.importers.common import Converter, constant_means_no_warmup, map_steps
from peftcli.recipe.importers.oumi_data import map_data
from peftcli.recipe.importers.result import ConfigImportError, ImportResult

TOOL = "oumi"
SECTIONS = ("model", "data", "training", "peft", "fsdp", "deepspeed")
# Mappings whose keys are not Oumi's own: kept whole and listed by their section key.
FREE_FORM = {
    "model.model_kwargs",
    "model.tokenizer_kwargs",
    "model.processor_kwargs",
    "model.chat_template_kwargs",
    "training.gradient_checkpointing_kwargs",
    "training.lr_scheduler_kwargs",
    "training.reward_function_kwargs",
    "training.verl_config_overrides",
    "training.grpo",
    "training.gkd",
    "training.gold",
    "training.profiler",
    "training.telemetry",
    "deepspeed.activation_checkpointing",
}
# params/training_params.py: trainer_type HF; per_device_train_batch_size 8, gradient_accumulation_steps 1,
# num_train_epochs 3, max_steps -1, learning_rate 5e-05, lr_scheduler_type "linear", warmup none, weight_decay 0.0,
# max_grad_norm 1.0, seed 42, mixed_precision_dtype NONE (no autocast), enable_gradient_checkpointing False,
# save_steps 500, eval_strategy "no", eval_steps 500, output_dir "output"
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 3,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "enable_gradient_checkpointing": False,
    "save_steps": 500,
    "eval_steps": 500,
    "output_dir": "output",
}
SFT_TRAINERS = ("HF", "TRL_SFT", "OUMI")
# params/peft_params.py: lora_r 8, lora_alpha 8, lora_dropout 0.0, lora_target_modules None (HF PEFT picks per
# architecture); q_lora_bits 4, bnb_4bit_quant_type "fp4", use_bnb_nested_quant False,
# bnb_4bit_compute_dtype "float32", bnb_4bit_quant_storage "uint8"
LORA_R = 8
LORA_ALPHA = 8
LORA_DROPOUT = 0.0
BNB_QUANT_TYPE = "fp4"
BNB_COMPUTE_DTYPE = "fp32"
DTYPES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "f16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "f32": "fp32",
    "float": "fp32",
    "auto": "auto",
}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")

_NO_EFFECT = {
    "model.load_pretrained_weights": "peftcli fine-tunes pretrained weights",
    "model.device_map": "peftcli places the model itself (one process per GPU)",
    "model.enable_liger_kernel": "peftcli has its own chunked loss (training.cross_entropy)",
    "model.shard_for_eval": "evaluation harness only",
    "model.tool_call_parser": "inference only",
    "model.chat_template_kwargs": "inference only",
    "training.gradient_checkpointing_kwargs": "peftcli picks the checkpointing variant itself (non-reentrant)",
    "training.per_device_eval_batch_size": "peftcli evaluates with training.batch_size",
    "training.log_level": "not a peftcli setting",
    "training.dep_log_level": "not a peftcli setting",
    "training.log_examples": "not a peftcli setting",
    "training.log_model_summary": "not a peftcli setting",
    "training.logging_strategy": "peftcli logs every training.log_every steps",
    "training.logging_dir": "trackers write under output.dir",
    "training.logging_first_step": "peftcli logs every training.log_every steps from the first",
    "training.include_performance_metrics": "peftcli logs its own throughput",
    "training.include_alternative_mfu_metrics": "peftcli logs its own throughput",
    "training.dataloader_num_workers": "peftcli tokenizes ahead of training; batches are built in the main process",
    "training.dataloader_persistent_workers": "peftcli uses no data-loader workers",
    "training.dataloader_prefetch_factor": "peftcli uses no data-loader workers",
    "training.dataloader_main_process_only": "peftcli uses no data-loader workers",
    "training.ddp_find_unused_parameters": "set by peftcli's launcher",
    "training.nccl_default_timeout_minutes": "set by peftcli's launcher",
    "training.empty_device_cache_steps": "peftcli manages the device cache itself",
    "training.label_ignore_index": "peftcli masks with its own label index",
    "training.profiler": "not a peftcli setting",
    "training.telemetry": "not a peftcli setting",
    "training.grpo": "GRPO settings; only supervised fine-tuning is imported",
    "training.gkd": "GKD settings; only supervised fine-tuning is imported",
    "training.gold": "GOLD settings; only supervised fine-tuning is imported",
    "training.verl_config_overrides": "verl settings; only supervised fine-tuning is imported",
    "training.reward_functions": "GRPO settings; only supervised fine-tuning is imported",
    "training.reward_function_kwargs": "GRPO settings; only supervised fine-tuning is imported",
    "training.save_final_model": "peftcli always saves the final adapter",
    "peft.lora_task_type": "peftcli takes the task from model.task",
}
_NOT_SUPPORTED = {
    "model.adapter_model": "to continue a peftcli run, set model.adapter to its run directory",
    "model.tokenizer_pad_token": "peftcli uses the tokenizer's own padding token",
    "model.tokenizer_kwargs": "peftcli passes no extra tokenizer options",
    "model.processor_kwargs": "multimodal models only",
    "model.model_kwargs": "peftcli passes no extra model options",
    "model.freeze_layers": "no layer freezing in peftcli; see method.modules_to_save",
    "training.lr_scheduler_kwargs": "peftcli's schedules take no extra options",
    "training.resume_from_checkpoint": "resume with `peft train RECIPE --resume`",
    "training.try_resume_from_last_checkpoint": "resume with `peft train RECIPE --resume`",
    "training.metrics_function": "peftcli reports loss and perplexity (see training.eval_generation)",
    "training.use_deterministic": "peftcli seeds everything but does not force deterministic kernels",
    "training.full_determinism": "peftcli seeds everything but does not force deterministic kernels",
    "training.sgd_momentum": "peftcli trains with AdamW variants only",
    "peft.llm_int8_skip_modules": "set model.quantization.skip_modules (suffix match) instead",
}


def detect_score(data: dict) -> int:
    """How strongly the keys say Oumi (0: not at all): its sections are mappings."""
    model, training = data.get("model"), data.get("training")
    if not isinstance(model, dict) or "model_name" not in model:
        return 0
    score = 3 + (2 if isinstance(training, dict) else 0)
    return score + sum(isinstance(data.get(section), dict) for section in ("data", "peft", "fsdp", "deepspeed"))


def convert(path: Path, data: dict) -> ImportResult:
    """Convert an Oumi training config mapping into a recipe mapping."""
    data = _resolve(path, data)
    for section in SECTIONS:
        if data.get(section) is not None and not isinstance(data[section], dict):
            what = "LoRA settings (Oumi's PEFT is LoRA)" if section == "peft" else "settings"
            raise ConfigImportError(
                f"{path}: {section}: a section (mapping) of {what} is expected, not {data[section]!r}"
            )
    conv = Converter(TOOL, path, _flatten(data))
    trainer = str(conv.take("training.trainer_type", "HF")).upper()
    if trainer not in SFT_TRAINERS:
        raise ConfigImportError(
            f"{path}: training.trainer_type {trainer}: only supervised fine-tuning (HF, TRL_SFT, OUMI) is imported"
        )
    precision = _upper(conv.data.get("training.mixed_precision_dtype", "NONE"))
    dtype = DTYPES.get(str(conv.data.get("model.torch_dtype_str", "auto")).lower())
    if precision in ("FP16", "BF16") and dtype != "fp32":  # core/configs/training_config.py refuses it too
        raise ConfigImportError(
            f"{path}: training.mixed_precision_dtype: {precision.lower()} mixed precision needs "
            "model.torch_dtype_str float32, as Oumi requires"
        )
    _model(conv)
    _method(conv)
    map_data(conv, trainer)
    _training(conv)
    _launch(conv, data)
    conv.list_unused(_NO_EFFECT, _NOT_SUPPORTED)
    return conv.finish()


# --- reading the nested file ---------------------------------------------------------------------------------


_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _resolve(path: Path, data: dict) -> dict:
    """Values written as `${section.key}` (OmegaConf references to another key) replaced by that key's value."""

    def lookup(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigImportError(f"{path}: ${{{dotted}}}: refers to a key the config does not set")
            node = node[part]
        return node

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, str):
            whole = _REFERENCE.fullmatch(value)
            if whole:
                return walk(lookup(whole.group(1)))
            if "${" in value:
                raise ConfigImportError(f"{path}: {value}: only whole-value ${{key}} references are read")
        return value

    return walk(data)


def _flatten(data: dict, prefix: str = "") -> dict:
    """The config as {dotted.key: value}; lists and free-form mappings are values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in FREE_FORM:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _upper(value: Any) -> str:
    return str(value).upper()


# --- sections -------------------------------------------------------------------------------------------------


def _model(conv: Converter) -> None:
    name = conv.take("model.model_name")
    if not name:
        raise ConfigImportError(f"{conv.path}: no model.model_name; an Oumi config names the model it trains")
    conv.put("model.name_or_path", conv.local_path(str(name)) or str(name))
    if conv.has("model.tokenizer_name"):
        tokenizer = str(conv.take("model.tokenizer_name"))
        conv.put("model.tokenizer", conv.local_path(tokenizer) or tokenizer)
    if conv.has("model.model_revision"):
        conv.put("model.revision", str(conv.take("model.model_revision")))
    if conv.take("model.trust_remote_code"):
        conv.put("model.trust_remote_code", True)
    dtype = str(conv.take("model.torch_dtype_str", "auto")).lower()
    if dtype in DTYPES:
        conv.put("model.dtype", DTYPES[dtype])
    else:
        conv.note("model.torch_dtype_str", f"{dtype}: peftcli's dtypes are auto, bf16, fp16 and fp32")
    attention = conv.take("model.attn_implementation")
    if attention:
        if attention in ATTENTION:
            conv.put("model.attn_implementation", attention)
        else:
            conv.note("model.attn_implementation", f"{attention}: peftcli takes {', '.join(ATTENTION)}")
    if conv.has("model.compile"):
        conv.note("model.compile", "Oumi refuses it for training (use training.compile); not carried")
    template = conv.take("model.chat_template")
    if template not in (None, "auto"):
        conv.note(
            "model.chat_template",
            f"{template}: peftcli renders chats with the tokenizer's own chat template, not Oumi's named templates; "
            "use a tokenizer that has this one (model.tokenizer)",
        )


def _method(conv: Converter) -> None:
    peft_keys = [key for key in conv.data if key.startswith("peft.")]
    if not conv.take("training.use_peft", False):
        conv.put("method", {"name": "full"})
        for key in peft_keys:
            if conv.has(key):
                conv.note(key, "training.use_peft is off, so Oumi fine-tunes the whole model and ignores it")
            conv.used.add(key)
        return
    conv.put("method.name", "lora")
    conv.copy("peft.lora_r", "method.r", LORA_R, "Oumi's lora_r default")
    conv.copy("peft.lora_alpha", "method.alpha", LORA_ALPHA, "Oumi's lora_alpha default")
    conv.copy("peft.lora_dropout", "method.dropout", LORA_DROPOUT, "Oumi's lora_dropout default", convert=float)
    targets = conv.take("peft.lora_target_modules")
    if targets is None:
        conv.note(
            "peft.lora_target_modules",
            "unset: Oumi lets HF PEFT pick per architecture (q_proj and v_proj for Llama-style models); the recipe "
            "keeps peftcli's all-linear, so set method.target_modules",
        )
    else:
        names = [str(t) for t in ([targets] if isinstance(targets, str) else targets)]
        conv.put("method.target_modules", "all-linear" if names == ["all-linear"] else names)
    excluded = conv.take("peft.lora_exclude_modules")
    if excluded:  # peft_params.py joins the regexes into one, matched against full module names
        names = [excluded] if isinstance(excluded, str) else list(excluded)
        conv.put("method.exclude_modules", "|".join(f"({name})" for name in names))
    if conv.has("peft.lora_target_parameters"):
        conv.put("method.target_parameters", list(conv.take("peft.lora_target_parameters")))
    if conv.has("peft.lora_modules_to_save"):
        conv.put("method.modules_to_save", list(conv.take("peft.lora_modules_to_save")))
    bias = conv.take("peft.lora_bias", "none")
    if bias != "none":
        conv.note("peft.lora_bias", f"{bias}: peftcli trains no bias")
    init = str(conv.take("peft.lora_init_weights", "default")).lower()
    if init in ("gaussian", "pissa", "olora") or init.startswith("pissa_niter_"):
        conv.put("method.init", init)
    elif init != "default":
        conv.note("peft.lora_init_weights", f"{init}: peftcli's inits are default, gaussian, pissa and olora")
    mode = str(conv.take("peft.peft_save_mode", "adapter_only")).lower()
    if mode != "adapter_only":
        conv.note("peft.peft_save_mode", f"{mode}: peftcli saves the adapter; merge it with `peft merge`")
    _quantization(conv)


def _quantization(conv: Converter) -> None:
    keys = ("q_lora_bits", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_compute_dtype")
    if not conv.take("peft.q_lora", False):
        for key in keys + ("bnb_4bit_quant_storage",):
            if conv.has(f"peft.{key}"):
                conv.note(f"peft.{key}", "peft.q_lora is off, so Oumi quantizes nothing")
            conv.used.add(f"peft.{key}")
        return
    bits = conv.take("peft.q_lora_bits", 4)
    if bits not in (4, 8):  # peft_params.py to_bits_and_bytes sets load_in_4bit/8bit from bits == 4/8 only
        conv.note("peft.q_lora_bits", f"{bits}: Oumi loads neither 4- nor 8-bit then; the base is left unquantized")
        return
    if bits == 8:
        conv.put("model.quantization", {"bits": 8})
        conv.used.update(f"peft.{key}" for key in keys[1:] + ("bnb_4bit_quant_storage",))
        return
    quant_type = str(conv.take("peft.bnb_4bit_quant_type", BNB_QUANT_TYPE))
    compute = str(conv.take("peft.bnb_4bit_compute_dtype", "float32")).lower()
    quant: dict[str, Any] = {
        "bits": 4,
        "quant_type": quant_type,
        "double_quant": bool(conv.take("peft.use_bnb_nested_quant", False)),
        "compute_dtype": DTYPES.get(compute, BNB_COMPUTE_DTYPE),
    }
    for key, value in (("quant_type", BNB_QUANT_TYPE), ("compute_dtype", BNB_COMPUTE_DTYPE)):
        if not conv.has(f"peft.bnb_4bit_{key}"):
            conv.defaults.append((f"model.quantization.{key}", value, f"Oumi's bnb_4bit_{key} default"))
    if not conv.has("peft.use_bnb_nested_quant"):
        conv.defaults.append(("model.quantization.double_quant", False, "Oumi's use_bnb_nested_quant default"))
    storage = str(conv.take("peft.bnb_4bit_quant_storage", "uint8")).lower()
    if storage != "uint8":
        quant["storage_dtype"] = DTYPES.get(storage, "bf16")
    conv.put("model.quantization", quant)


def _training(conv: Converter) -> None:
    t = "training."

    def why(key: str) -> str:
        return f"Oumi's {key} default"

    steps = conv.take(t + "max_steps", -1)
    if isinstance(steps, int) and steps > 0:
        conv.put("training.max_steps", steps)
        if conv.has(t + "num_train_epochs"):
            conv.note(t + "num_train_epochs", "max_steps is set and ends the run first; peftcli takes one of the two")
    else:
        epochs = TRAINING_DEFAULTS["num_train_epochs"]
        conv.copy(t + "num_train_epochs", "training.epochs", epochs, why("num_train_epochs"), convert=float)
    for key, dotted in (
        ("per_device_train_batch_size", "training.batch_size"),
        ("gradient_accumulation_steps", "training.gradient_accumulation"),
        ("seed", "training.seed"),
    ):
        conv.copy(t + key, dotted, TRAINING_DEFAULTS[key], why(key), convert=int)
    for key, dotted in (("learning_rate", "training.learning_rate"), ("weight_decay", "training.weight_decay")):
        conv.copy(t + key, dotted, TRAINING_DEFAULTS[key], why(key), convert=float)
    conv.map_schedule(t + "lr_scheduler_type", TRAINING_DEFAULTS["lr_scheduler_type"], why("lr_scheduler_type"))
    if conv.has(t + "warmup_steps"):  # training_params.py: warmup_steps wins over warmup_ratio
        conv.put("training.warmup_steps", int(conv.take(t + "warmup_steps")))
        if conv.has(t + "warmup_ratio"):
            conv.note(t + "warmup_ratio", "warmup_steps is set and wins, as in Oumi")
    elif conv.has(t + "warmup_ratio"):
        conv.put("training.warmup_ratio", float(conv.take(t + "warmup_ratio")))
    constant_means_no_warmup(conv, t + "lr_scheduler_type", prefix=t)
    norm = conv.take(t + "max_grad_norm", TRAINING_DEFAULTS["max_grad_norm"])
    conv.put("training.max_grad_norm", float(norm) if norm else None)  # 0 or null: no clipping
    if not conv.has(t + "max_grad_norm"):
        conv.defaults.append(("training.max_grad_norm", 1.0, why("max_grad_norm")))
    conv.map_optimizer(t + "optimizer")
    betas = [float(conv.take(t + "adam_beta1", 0.9)), float(conv.take(t + "adam_beta2", 0.999))]
    if betas != [0.9, 0.999]:
        conv.put("training.betas", betas)
    epsilon = conv.take(t + "adam_epsilon")
    if epsilon is not None and float(epsilon) != 1e-8:
        conv.note(t + "adam_epsilon", f"{epsilon}: peftcli's AdamW epsilon is fixed at 1e-8")
    _precision(conv)
    conv.copy(
        t + "enable_gradient_checkpointing",
        "training.activation_checkpointing",
        False,
        why("enable_gradient_checkpointing"),
        convert=bool,
    )
    if conv.take(t + "compile"):
        conv.put("training.compile", True)
    map_steps(conv, t + "logging_steps", "training.log_every")
    _evaluation(conv)
    _saving(conv)
    _trackers(conv)
    conv.copy(t + "output_dir", "output.dir", TRAINING_DEFAULTS["output_dir"], why("output_dir"))
    for key in [k for k in conv.data if k.startswith(t + "trainer_kwargs.")]:
        if key not in conv.used and conv.has(key):
            conv.note(key, "passed to the HF/TRL trainer by Oumi; not a setting peftcli carries")


def _precision(conv: Converter) -> None:
    key = "training.mixed_precision_dtype"
    value = _upper(conv.take(key, "NONE"))
    deepspeed = _upper(conv.data.get("deepspeed.precision")) if conv.data.get("deepspeed.enable_deepspeed") else None
    if value in ("FP16", "BF16"):
        conv.put("training.precision", value.lower())
    elif deepspeed in ("FP16", "BF16"):
        conv.put("training.precision", deepspeed.lower())  # the DeepSpeed config's own fp16/bf16 section
        conv.note("deepspeed.precision", f"{deepspeed.lower()}: carried as training.precision")
    else:
        conv.put("training.precision", "fp32")
        if not conv.has(key):
            conv.defaults.append(("training.precision", "fp32", "Oumi's mixed_precision_dtype default: none"))


def _evaluation(conv: Converter) -> None:
    strategy = str(conv.take("training.eval_strategy", "no")).lower()
    if strategy == "no":
        if conv.has("training.eval_steps"):
            conv.note("training.eval_steps", "eval_strategy is no, so Oumi does not evaluate")
        if conv.get("data.validation"):
            conv.put("training.eval_at_start", False)
            conv.note("training.eval_strategy", "no: Oumi does not evaluate; peftcli evaluates at the end")
        return
    if not conv.get("data.validation"):
        conv.note("training.eval_strategy", f"{strategy}: no validation data was mapped, so nothing is evaluated")
        conv.used.add("training.eval_steps")
        return
    conv.put("training.eval_at_start", False)
    conv.defaults.append(("training.eval_at_start", False, "the HF Trainer's eval_on_start default, which Oumi keeps"))
    if strategy == "steps":
        if conv.has("training.eval_steps"):
            map_steps(conv, "training.eval_steps", "training.eval_every")
        else:
            conv.copy("training.eval_steps", "training.eval_every", 500, "Oumi's eval_steps default")
    else:
        conv.note(
            "training.eval_strategy", f"{strategy}: peftcli evaluates every training.eval_every steps and at the end"
        )


def _saving(conv: Converter) -> None:
    """training_params.py to_hf: save_steps > 0 saves on steps, else save_epoch saves per epoch, else none."""
    steps, epoch = conv.take("training.save_steps", 500), conv.take("training.save_epoch", False)
    if steps and steps > 0:
        conv.put("training.save_every", int(steps))
        if not conv.has("training.save_steps"):
            conv.defaults.append(("training.save_every", 500, "Oumi's save_steps default"))
        if epoch:
            conv.note("training.save_epoch", "save_steps is set and wins, as in Oumi")
    elif epoch:
        conv.note("training.save_epoch", "peftcli counts checkpoints in steps; set training.save_every")
    limit = "training.trainer_kwargs.save_total_limit"
    if conv.has(limit):
        conv.put("training.keep_checkpoints", int(conv.take(limit)))
    elif conv.get("training.save_every"):
        conv.note(
            "training.save_steps",
            "Oumi keeps every checkpoint (the HF Trainer's save_total_limit none); peftcli keeps the newest "
            "training.keep_checkpoints (2)",
        )


def _trackers(conv: Converter) -> None:
    report = [name for name in ("wandb", "tensorboard", "mlflow") if conv.take(f"training.enable_{name}")]
    if report:
        conv.put("training.report_to", report)
        if conv.has("training.run_name"):
            conv.put("training.tracking.run_name", str(conv.take("training.run_name")))
    else:
        conv.no_effect("training.run_name", "no tracker enabled")


def _launch(conv: Converter, data: dict) -> None:
    fsdp_keys = [key for key in conv.data if key.startswith("fsdp.")]
    deepspeed_keys = [key for key in conv.data if key.startswith("deepspeed.")]
    if conv.take("fsdp.enable_fsdp", False):
        conv.put("launch", {"preset": "fsdp2"})
        conv.note(
            "fsdp.enable_fsdp",
            "approximated by launch.preset fsdp2 (FSDP2, one wrap per decoder layer); the fsdp section's sharding, "
            "wrapping, offload and state-dict options are not carried",
        )
        for key in fsdp_keys:
            conv.used.add(key)
    else:
        for key in fsdp_keys:
            conv.no_effect(key, "FSDP is off (fsdp.enable_fsdp)")
    section = data.get("deepspeed") or {}
    if not conv.take("deepspeed.enable_deepspeed", False):
        for key in deepspeed_keys:
            conv.no_effect(key, "DeepSpeed is off (deepspeed.enable_deepspeed)")
        return
    for key in deepspeed_keys:
        conv.used.add(key)
    if section.get("deepspeed_config_path"):  # deepspeed_params.py: the file replaces the other fields
        conv.map_deepspeed("deepspeed.deepspeed_config_path")
        return
    stage_name = _upper(section.get("zero_stage", "0")).removeprefix("ZERO_")
    if stage_name not in ("0", "1", "2", "3"):
        raise ConfigImportError(f"{conv.path}: deepspeed.zero_stage: {section['zero_stage']} is not ZERO_0 to ZERO_3")
    stage = int(stage_name)
    zero: dict[str, Any] = {"stage": stage}
    for part in ("offload_optimizer", "offload_param"):
        if section.get(part) is not None:  # an OffloadConfig; its device defaults to cpu
            zero[part] = {"device": str((section[part] or {}).get("device", "cpu")).lower()}
    conv.map_deepspeed("deepspeed.enable_deepspeed", {"zero_optimization": zero}, "the deepspeed section")
