"""Axolotl YAML -> recipe.

Axolotl's defaults below come from its pydantic schema (src/axolotl/utils/schemas/) and the trainer builder that
turns the config into HF TrainingArguments (src/axolotl/core/builders/base.py); each constant names its file.
"""

from __future__ import annotations

from pathlib import Path

from peftcli.recipe.importers.common import (
    Converter,
    chat_columns,
    constant_means_no_warmup,
    finish_sources,
    make_source,
    map_steps,
    validation_from_size,
)
from peftcli.recipe.importers.result import ConfigImportError, ImportResult

TOOL = "axolotl"
# Checked against axolotl-ai-cloud/axolotl at 067b021 (2026-07-24); paths are under src/axolotl/.
# utils/schemas/config.py: `sequence_len: int = Field(default=512)`
SEQUENCE_LEN = 512
# utils/schemas/training.py: `micro_batch_size` and `gradient_accumulation_steps` default 1
MICRO_BATCH_SIZE = 1
GRADIENT_ACCUMULATION = 1
# utils/schemas/training.py: `num_epochs: float = Field(default=1.0)`
NUM_EPOCHS = 1.0
# utils/schemas/training.py: `lr_scheduler: str | None = "cosine"`
LR_SCHEDULER = "cosine"
# utils/schemas/training.py: `weight_decay` default 0.0; utils/schemas/peft.py: `lora_dropout` default 0.0
WEIGHT_DECAY = 0.0
LORA_DROPOUT = 0.0
# utils/schemas/training.py: `train_on_inputs` default False, `group_by_length` None (the HF Trainer's False);
# utils/schemas/config.py: `sample_packing` None (off)
TRAIN_ON_INPUTS = False
GROUP_BY_LENGTH = False
# utils/schemas/model.py: `output_dir` default "./model-out"
OUTPUT_DIR = "./model-out"
# utils/schemas/config.py: `bf16: Literal["auto"] | bool | None = "auto"` (bf16 where the GPU supports it)
BF16 = "auto"
# core/builders/base.py passes max_grad_norm and seed to the HF Trainer only when set, so HF's 1.0 and 42 apply.
MAX_GRAD_NORM = 1.0
SEED = 42
# core/builders/base.py (_configure_warmup_and_logging): with neither warmup key, min(3% of the steps, 100).
WARMUP_RATIO = 0.03
# core/builders/base.py (_configure_save_and_eval_strategy): `save_total_limit` 4 when unset, a checkpoint
# every epoch when neither save_steps/saves_per_epoch nor save_strategy is set, and eval_on_start True whenever
# it evaluates on steps or a strategy.
SAVE_TOTAL_LIMIT = 4
# peftcli's own LoRA defaults, written out where Axolotl has none (see _method)
PEFTCLI_R = 8
PEFTCLI_ALPHA = 16

_CLASS_PICKERS = (
    "model_type",
    "tokenizer_type",
    "tokenizer_use_fast",
    "tokenizer_legacy",
    "is_llama_derived_model",
    "is_mistral_derived_model",
    "is_qwen_derived_model",
    "is_falcon_derived_model",
)
_NO_EFFECT = {
    "strict": "peftcli always refuses unknown recipe keys",
    "dataset_prepared_path": "peftcli caches tokenized data itself (PEFTCLI_DATA_CACHE)",
    "pad_to_sequence_len": "peftcli pads each batch to its longest row; the loss is the same",
    "local_rank": "set by the launcher",
    "save_safetensors": "peftcli always writes safetensors",
    "debug": "peftcli has no debug dump of the prepared data",
    "eval_table_size": "no sample-generation table in peftcli (see training.eval_generation)",
    "eval_max_new_tokens": "no sample-generation table in peftcli (see training.eval_generation)",
    "eval_table_max_new_tokens": "no sample-generation table in peftcli (see training.eval_generation)",
    "lora_on_cpu": "peftcli places adapter weights with the base layer",
    "tf32": "peftcli leaves the TF32 matmul setting to torch",
    "gradient_checkpointing_kwargs": "peftcli picks the checkpointing variant itself (non-reentrant)",
    "eval_sample_packing": "peftcli evaluates unpacked rows",
    "shuffle_merged_datasets": "peftcli shuffles the training rows every epoch",
    "dataset_processes": "peftcli picks its own number of preprocessing workers",
    "ddp_find_unused_parameters": "peftcli's launcher sets DDP options itself",
}
_NOT_SUPPORTED = {
    "special_tokens": "peftcli uses the tokenizer's own special tokens and cannot add or replace them; use a "
    "tokenizer that has them (model.tokenizer)",
    "tokens": "peftcli cannot add tokens to the tokenizer",
    "chat_template_jinja": "peftcli renders chats with the tokenizer's own template; use a tokenizer that has it",
    "lora_model_dir": "an Axolotl adapter directory; to continue a peftcli run set model.adapter to its run directory",
    "resume_from_checkpoint": "resume with `peft train RECIPE --resume`",
    "auto_resume_from_checkpoints": "resume with `peft train RECIPE --resume`",
    "early_stopping_patience": "peftcli has no early stopping",
    "neftune_noise_alpha": "peftcli has no NEFTune noise",
    "lr_scheduler_kwargs": "peftcli's schedules take no extra options",
    "cosine_min_lr_ratio": "peftcli's cosine decays to zero",
    "adam_epsilon": "peftcli's AdamW epsilon is fixed at 1e-8",
    "xformers_attention": "no xformers attention in peftcli; model.attn_implementation auto picks one",
    "hub_model_id": "peftcli does not upload; push the run directory yourself",
    "push_to_hub": "peftcli does not upload; push the run directory yourself",
    "hub_strategy": "peftcli does not upload; push the run directory yourself",
    "wandb_watch": "peftcli logs metrics only, not gradients",
    "wandb_log_model": "peftcli does not upload checkpoints to W&B",
    "wandb_run_id": "W&B picks the run id",
    "loss_watchdog_threshold": "peftcli stops on a non-finite loss only",
    "loss_watchdog_patience": "peftcli stops on a non-finite loss only",
    "evals_per_epoch": "peftcli counts evaluation in steps; set training.eval_every",
    "saves_per_epoch": "peftcli counts checkpoints in steps; set training.save_every",
    "gptq": "peftcli quantizes with bitsandbytes only",
    "bnb_config_kwargs": "set model.quantization's options (quant_type, double_quant, compute_dtype) instead",
    "unfrozen_parameters": "no parameter-name unfreezing in peftcli; see method.modules_to_save",
}


def detect_score(data: dict) -> int:
    """How strongly the keys say Axolotl (0: not at all)."""
    marks = (
        "base_model",
        "micro_batch_size",
        "sequence_len",
        "num_epochs",
        "lora_target_linear",
        "sample_packing",
        "train_on_inputs",
        "val_set_size",
        "adapter",
        "lr_scheduler",
        "peft_use_dora",
        "dataset_prepared_path",
    )
    score = sum(key in data for key in marks)
    datasets = data.get("datasets")
    if isinstance(datasets, list) and datasets and all(isinstance(d, dict) for d in datasets):
        score += 2
    return score


def convert(path: Path, data: dict) -> ImportResult:
    """Convert an Axolotl config mapping into a recipe mapping."""
    conv = Converter(TOOL, path, data)
    if conv.has("rl") or conv.has("reward_model") or conv.has("process_reward_model"):
        kind = data.get("rl") or "reward model"
        raise ConfigImportError(f"{path}: {kind} training: only supervised fine-tuning configs are imported")
    _model(conv)
    _method(conv)
    _data(conv)
    _training(conv)
    _launch(conv)
    for key in _CLASS_PICKERS:
        conv.no_effect(key, "transformers' Auto classes pick the model and tokenizer classes")
    conv.list_unused(_NO_EFFECT, _NOT_SUPPORTED)
    conv.copy("output_dir", "output.dir", OUTPUT_DIR, "Axolotl's output_dir default")
    return conv.finish()


def _model(conv: Converter) -> None:
    if not conv.has("base_model"):
        raise ConfigImportError(f"{conv.path}: no base_model; an Axolotl config names the model it trains")
    name = str(conv.take("base_model"))
    conv.put("model.name_or_path", conv.local_path(name) or name)
    if conv.has("tokenizer_config"):
        tokenizer = str(conv.take("tokenizer_config"))
        conv.put("model.tokenizer", conv.local_path(tokenizer) or tokenizer)
    if conv.has("revision_of_model"):
        conv.put("model.revision", str(conv.take("revision_of_model")))
    if conv.take("trust_remote_code"):
        conv.put("model.trust_remote_code", True)
    if conv.has("base_model_config"):
        conv.note("base_model_config", "peftcli reads the model's own config.json; point model.name_or_path at it")
    adapter = conv.take("adapter")
    four, eight = conv.take("load_in_4bit", False), conv.take("load_in_8bit", False)
    if adapter == "qlora":
        # loaders/model.py builds this BitsAndBytesConfig for adapter qlora (which requires load_in_4bit): NF4,
        # double quantization, compute in the model's dtype
        conv.put("model.quantization", {"bits": 4, "quant_type": "nf4", "double_quant": True})
    elif adapter == "lora" and eight:
        conv.put("model.quantization", {"bits": 8})
    if four and adapter != "qlora":
        conv.note(
            "load_in_4bit",
            f"Axolotl quantizes to 4 bits only with adapter qlora (loaders/model.py), not with adapter {adapter}; "
            "the base is left unquantized, as there",
        )
    if eight and adapter != "lora":
        conv.note("load_in_8bit", f"Axolotl loads in 8 bits only with adapter lora, not {adapter}; left unquantized")
    attention = [k for k in ("flash_attention", "sdp_attention", "flex_attention") if conv.take(k)]
    if attention:
        name = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "flex_attention": "flex_attention"}
        conv.put("model.attn_implementation", name[attention[0]])
    for key in ("flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp"):
        if conv.take(key):
            conv.note(key, "a fused flash-attn kernel peftcli does not have; the plain kernels give the same result")
    template = conv.take("chat_template")
    if template not in (None, "tokenizer_default"):
        conv.note(
            "chat_template",
            f"{template}: peftcli renders chats with the tokenizer's own chat template; use "
            "a tokenizer with this template (model.tokenizer)",
        )


def _method(conv: Converter) -> None:
    adapter = conv.data.get("adapter")
    lora_keys = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_target_linear",
        "lora_modules_to_save",
        "peft_use_dora",
        "peft_use_rslora",
        "lora_fan_in_fan_out",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "peft_layers_to_transform",
        "peft_init_lora_weights",
    )
    if adapter in (None, ""):
        conv.put("method", {"name": "full"})
        for key in lora_keys:
            if conv.has(key):
                conv.note(key, "no adapter in the source (full fine-tuning), so LoRA options do not apply")
            conv.used.add(key)
        return
    if adapter not in ("lora", "qlora"):
        raise ConfigImportError(f"{conv.path}: adapter {adapter}: only lora and qlora are imported")
    conv.put("method.name", "lora")
    for key, dotted, ours in (("lora_r", "method.r", PEFTCLI_R), ("lora_alpha", "method.alpha", PEFTCLI_ALPHA)):
        if conv.has(key):
            conv.put(dotted, conv.take(key))
        else:
            # loaders/adapter.py passes the unset value (None) to HF PEFT's LoraConfig, which then fails
            conv.note(key, f"unset: Axolotl hands None to HF PEFT, which refuses it; the recipe takes peftcli's {ours}")
            conv.put(dotted, ours)
    conv.copy("lora_dropout", "method.dropout", LORA_DROPOUT, "Axolotl's lora_dropout default")
    modules = conv.take("lora_target_modules")
    if conv.take("lora_target_linear"):
        conv.put("method.target_modules", "all-linear")
        if modules:
            conv.note(
                "lora_target_modules",
                "merged into all-linear (lora_target_linear), which covers every linear "
                "layer; add non-linear names (embeddings) to method.target_modules as a list if they mattered",
            )
    elif modules:
        conv.put("method.target_modules", modules if isinstance(modules, (list, str)) else list(modules))
    else:
        conv.note(
            "lora_target_modules",
            "unset and lora_target_linear off: Axolotl passes an empty target list and HF PEFT finds no module "
            "to adapt (loaders/adapter.py); the recipe keeps peftcli's all-linear, so set method.target_modules",
        )
    if conv.has("lora_modules_to_save"):
        conv.put("method.modules_to_save", list(conv.take("lora_modules_to_save")))
    if conv.take("peft_use_dora"):
        conv.put("method.dora", True)
    if conv.take("peft_use_rslora"):
        conv.put("method.rslora", True)
    if conv.has("loraplus_lr_ratio"):
        conv.put("method.loraplus_lr_ratio", float(conv.take("loraplus_lr_ratio")))
    if conv.has("loraplus_lr_embedding"):
        conv.note(
            "loraplus_lr_embedding",
            "an absolute learning rate in Axolotl; peftcli's is a multiple of "
            "training.learning_rate: set method.loraplus_lr_embedding to their ratio",
        )
    if conv.has("peft_layers_to_transform"):
        conv.put("method.layers_to_transform", conv.take("peft_layers_to_transform"))
    init = conv.take("peft_init_lora_weights")
    if init not in (None, True):
        if isinstance(init, str) and init in ("gaussian", "pissa", "olora"):
            conv.put("method.init", init)
        else:
            conv.note("peft_init_lora_weights", f"{init}: peftcli's inits are default, gaussian, pissa and olora")
    if conv.take("lora_fan_in_fan_out"):
        conv.note("lora_fan_in_fan_out", "peftcli detects transposed (Conv1D) weights itself")


def _dataset(conv: Converter, key: str, entry) -> dict | None:
    """One Axolotl `datasets` entry as a peftcli data source, or None (with a note) when no format fits."""
    if not isinstance(entry, dict) or not entry.get("path"):
        conv.note(key, "an entry without a path")
        return None
    entry = dict(entry)
    path, kind = str(entry.pop("path")), entry.pop("type", None)
    files = entry.pop("data_files", None)
    if files and not conv.local_path(path):  # `path: json` with the file in data_files
        files = files if isinstance(files, str) else (files[0] if len(files) == 1 else None)
        if files is None:
            conv.note(f"{key}.data_files", "several files in one entry; give each its own datasets entry")
            return None
        path = str(files)
    extra = {"split": entry.pop("split", None), "subset": entry.pop("name", None)}
    entry.pop("ds_type", None)  # the file suffix tells peftcli the same
    if extra["split"] == "train":
        extra["split"] = None
    base = str(kind).split(":")[0].split(".")[0] if isinstance(kind, str) else None
    columns: dict[str, str] | None = {}
    if base and base.startswith("alpaca"):
        fmt = "alpaca"
        for field, ours in (("field_instruction", "instruction"), ("field_input", "input"), ("field_output", "output")):
            if field in entry:
                columns[ours] = str(entry.pop(field))
        conv.note(
            f"{key}.type",
            f"{kind}: approximated by format alpaca; Axolotl wraps rows in its Alpaca prompt "
            "('Below is an instruction...'), peftcli renders them with the tokenizer's chat template (or "
            "plain text when it has none)",
        )
    elif base in ("chat_template", "sharegpt"):
        fmt = "chat"
        legacy = base == "sharegpt"
        column = str(entry.pop("field_messages", "conversations" if legacy else "messages"))
        mapping = dict(entry.pop("message_property_mappings", None) or {})
        names = {
            "role": str(entry.pop("message_field_role", mapping.get("role", "from" if legacy else "role"))),
            "content": str(
                entry.pop("message_field_content", mapping.get("content", "value" if legacy else "content"))
            ),
        }
        roles = entry.pop("roles", None)
        if legacy and not roles:
            names.update(user="human", assistant="gpt")
        columns = chat_columns(conv, f"{key}.type", column, names)
        trained = entry.pop("roles_to_train", None)
        if trained not in (None, ["assistant"], ["gpt"]):
            conv.note(f"{key}.roles_to_train", f"{trained}: peftcli trains on assistant turns only (data.mask_prompt)")
        eos = entry.pop("train_on_eos", None)
        if eos not in (None, "turn"):
            conv.note(f"{key}.train_on_eos", f"{eos}: peftcli trains on the end-of-turn token of each assistant turn")
        entry.pop("conversation", None)  # a legacy template name; the tokenizer's template is used
        if columns is None:
            return None
    elif base == "completion":
        fmt = "text"
        field = str(entry.pop("field", "text"))
        columns = {} if field == "text" else {"text": field}
    else:
        conv.note(
            f"{key}.type",
            f"{kind}: no peftcli data format reads it (peftcli reads alpaca, chat_template/"
            "sharegpt chats and completion text); the dataset was left out",
        )
        return None
    for rest in entry:
        conv.note(f"{key}.{rest}", "a dataset option peftcli has no equivalent for")
    return make_source(conv, f"{key}.path", path, fmt, columns, **extra)


def _data(conv: Converter) -> None:
    datasets = conv.take("datasets") or []
    for index, entry in enumerate(datasets if isinstance(datasets, list) else [datasets]):
        source = _dataset(conv, f"datasets[{index}]", entry)
        if source:
            conv.sources.append(source)
    finish_sources(conv)
    tests = conv.take("test_datasets")
    if tests:
        first = _dataset(conv, "test_datasets[0]", tests[0]) if isinstance(tests, list) else None
        if first:
            conv.put("data.validation", first)
        if isinstance(tests, list) and len(tests) > 1:
            conv.note("test_datasets", "peftcli validates on one data source; only the first was kept")
        conv.used.add("val_set_size")
    else:
        validation_from_size(conv, "val_set_size")
    conv.copy("sequence_len", "data.max_length", SEQUENCE_LEN, "Axolotl's sequence_len default")
    conv.copy(
        "train_on_inputs",
        "data.mask_prompt",
        not TRAIN_ON_INPUTS,
        "Axolotl's train_on_inputs default, false",
        convert=lambda v: not v,
    )
    conv.copy("sample_packing", "data.packing", False, "Axolotl packs only with sample_packing", convert=bool)
    conv.copy(
        "group_by_length", "data.group_by_length", GROUP_BY_LENGTH, "Axolotl's group_by_length default", convert=bool
    )


def _training(conv: Converter) -> None:
    if conv.has("max_steps"):
        conv.put("training.max_steps", int(conv.take("max_steps")))
        if conv.has("num_epochs"):
            conv.note("num_epochs", "max_steps is set and ends the run first; peftcli takes one of the two")
    else:
        conv.copy("num_epochs", "training.epochs", NUM_EPOCHS, "Axolotl's num_epochs default", convert=float)
    conv.copy("micro_batch_size", "training.batch_size", MICRO_BATCH_SIZE, "Axolotl's micro_batch_size default")
    conv.copy(
        "gradient_accumulation_steps",
        "training.gradient_accumulation",
        GRADIENT_ACCUMULATION,
        "Axolotl's gradient_accumulation_steps default",
    )
    if conv.has("learning_rate"):
        conv.put("training.learning_rate", float(conv.take("learning_rate")))
    else:  # utils/schemas/training.py: `learning_rate: str | float`, a required field
        conv.note("learning_rate", "unset: Axolotl requires it; the recipe keeps peftcli's default, so set it")
    conv.map_schedule("lr_scheduler", LR_SCHEDULER, "Axolotl's lr_scheduler default")
    if conv.has("warmup_steps"):
        conv.put("training.warmup_steps", int(conv.take("warmup_steps")))
        conv.used.add("warmup_ratio")
    elif conv.has("warmup_ratio"):
        conv.put("training.warmup_ratio", float(conv.take("warmup_ratio")))
    else:
        conv.used.update({"warmup_steps", "warmup_ratio"})
        conv.put("training.warmup_ratio", WARMUP_RATIO)
        conv.defaults.append(("training.warmup_ratio", WARMUP_RATIO, "Axolotl's warm-up when none is set"))
        conv.note(
            "warmup_steps",
            "unset: Axolotl warms up for min(3% of the steps, 100); written as warmup_ratio "
            "0.03, which has no 100-step cap",
        )
    constant_means_no_warmup(conv, "lr_scheduler")
    conv.copy("weight_decay", "training.weight_decay", WEIGHT_DECAY, "Axolotl's weight_decay default", convert=float)
    conv.copy(
        "max_grad_norm", "training.max_grad_norm", MAX_GRAD_NORM, "HF TrainingArguments' max_grad_norm", convert=float
    )
    conv.copy("seed", "training.seed", SEED, "HF TrainingArguments' seed, which Axolotl keeps when unset")
    conv.map_optimizer("optimizer")
    betas = (conv.take("adam_beta1"), conv.take("adam_beta2"))
    if any(b is not None for b in betas):
        conv.put("training.betas", [float(betas[0] or 0.9), float(betas[1] or 0.999)])
    bf16, fp16 = conv.take("bf16", BF16), conv.take("fp16")
    if bf16 in (True, "full"):
        conv.put("training.precision", "bf16")
        if bf16 == "full":
            conv.note(
                "bf16",
                "full: peftcli keeps the base in model.dtype and computes in bf16 autocast; set "
                "model.dtype bf16 for pure bf16 weights",
            )
    elif fp16:
        conv.put("training.precision", "fp16")
    elif bf16 == "auto":
        conv.put("training.precision", "auto")
    else:
        conv.put("training.precision", "fp32")
    checkpointing = conv.take("gradient_checkpointing")
    if checkpointing:
        conv.put("training.activation_checkpointing", True)
        if checkpointing is not True:
            conv.note("gradient_checkpointing", f"{checkpointing}: peftcli recomputes on the GPU without offloading")
    if conv.take("torch_compile"):
        conv.put("training.compile", True)
    map_steps(conv, "logging_steps", "training.log_every")
    _evaluation(conv)
    _saving(conv)
    _trackers(conv)


def _evaluation(conv: Converter) -> None:
    """As core/builders/base.py: with validation data, Axolotl evaluates on eval_steps (or evals_per_epoch) or an
    eval_strategy, and then also before the first step (eval_on_start); with none of them it does not evaluate."""
    if not conv.get("data.validation"):
        for key in ("eval_steps", "eval_strategy"):
            if conv.has(key):
                conv.note(key, "no validation data (val_set_size or test_datasets), so nothing to evaluate")
        return
    strategy = conv.take("eval_strategy")
    evaluates = conv.has("eval_steps") or conv.has("evals_per_epoch") or strategy not in (None, "no")
    map_steps(conv, "eval_steps", "training.eval_every")
    conv.put("training.eval_at_start", bool(evaluates))
    if evaluates:
        conv.defaults.append(("training.eval_at_start", True, "Axolotl sets eval_on_start when it evaluates"))
        if strategy not in (None, "no", "steps"):
            conv.note("eval_strategy", f"{strategy}: peftcli evaluates every training.eval_every steps; set it")
    else:
        conv.defaults.append(("training.eval_at_start", False, "Axolotl does not evaluate without eval settings"))
        conv.note(
            "eval_steps",
            f"{'eval_strategy no' if strategy == 'no' else 'unset (nor evals_per_epoch, eval_strategy)'}: Axolotl "
            "does not evaluate during training; peftcli evaluates the validation data at the end",
        )


def _saving(conv: Converter) -> None:
    strategy = conv.take("save_strategy")
    map_steps(conv, "save_steps", "training.save_every")
    if not (conv.has("save_steps") or conv.has("saves_per_epoch") or strategy is not None):
        conv.note(
            "save_steps",
            "unset (nor saves_per_epoch, save_strategy): Axolotl checkpoints at the end of every epoch; peftcli "
            "counts checkpoints in steps, so set training.save_every",
        )
    elif strategy not in (None, "steps", "no"):
        conv.note("save_strategy", f"{strategy}: peftcli checkpoints every training.save_every steps; set it")
    conv.copy(
        "save_total_limit",
        "training.keep_checkpoints",
        SAVE_TOTAL_LIMIT,
        "Axolotl keeps 4 checkpoints unless save_total_limit is set",
        convert=int,
    )


def _trackers(conv: Converter) -> None:
    report = []
    if conv.has("wandb_project"):
        report.append("wandb")
        conv.put("training.tracking.wandb.project", str(conv.take("wandb_project")))
        if conv.has("wandb_entity"):
            conv.put("training.tracking.wandb.entity", str(conv.take("wandb_entity")))
        if conv.has("wandb_name"):
            conv.put("training.tracking.run_name", str(conv.take("wandb_name")))
        if conv.has("wandb_mode") and conv.data["wandb_mode"] in ("online", "offline"):
            conv.put("training.tracking.wandb.mode", conv.take("wandb_mode"))
    if conv.take("use_tensorboard"):
        report.append("tensorboard")
    if conv.has("mlflow_experiment_name") or conv.has("mlflow_tracking_uri"):
        report.append("mlflow")
        if conv.has("mlflow_tracking_uri"):
            conv.put("training.tracking.mlflow.tracking_uri", str(conv.take("mlflow_tracking_uri")))
        if conv.has("mlflow_experiment_name"):
            conv.put("training.tracking.mlflow.experiment", str(conv.take("mlflow_experiment_name")))
    if report:
        conv.put("training.report_to", report)


def _launch(conv: Converter) -> None:
    conv.map_deepspeed("deepspeed")
    conv.map_fsdp(["fsdp", "fsdp_config", "fsdp_version"])
    quant = conv.get("model.quantization")
    if conv.get("launch.preset") == "fsdp2" and quant and quant["bits"] == 4:
        # As Axolotl does for QLoRA under FSDP: store the packed 4-bit weights as bf16 so FSDP can shard them
        quant["storage_dtype"] = "bf16"
        conv.put("training.precision", "bf16")
