"""HF `TrainingArguments` keys, shared by the LLaMA-Factory and HF/TRL importers (both pass them to the HF Trainer).

Defaults are those of transformers' TrainingArguments (its docstring in training_args.py); a tool that changes
one (TRL's SFTConfig, LLaMA-Factory, ms-swift) passes its own in `defaults`, and may say why in `reasons`.
"""

from __future__ import annotations

from typing import Any

from peftcli.recipe.importers.common import Converter, constant_means_no_warmup, map_steps

# transformers TrainingArguments: learning_rate 5e-5, num_train_epochs 3.0, per_device_train_batch_size 8,
# gradient_accumulation_steps 1, lr_scheduler_type "linear", weight_decay 0.0, max_grad_norm 1.0, seed 42,
# bf16/fp16 False (fp32 training), gradient_checkpointing False, group_by_length False,
# save_strategy "steps" with save_steps 500, eval_strategy "no" (eval_steps None: logging_steps), AdamW betas
# 0.9 and 0.999.
HF_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "group_by_length": False,
    "save_steps": 500,
    "output_dir": "trainer_output",
    "eval_strategy": "no",
    "eval_steps": None,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
}
# peftcli's AdamW betas (training.betas)
BETAS = (0.9, 0.999)

# torch.optim.AdamW's eps, which peftcli's optimizers keep
ADAM_EPSILON = 1e-8

NO_EFFECT = {
    "do_train": "peft train always trains",
    "do_eval": "peftcli evaluates whenever data.validation is set",
    "per_device_eval_batch_size": "peftcli evaluates with training.batch_size",
    "logging_dir": "trackers write under output.dir",
    "logging_first_step": "peftcli logs every training.log_every steps from the first",
    "logging_strategy": "peftcli logs every training.log_every steps",
    "remove_unused_columns": "peftcli reads only the columns of the data format",
    "dataloader_num_workers": "peftcli tokenizes ahead of training; batches are built in the main process",
    "dataloader_pin_memory": "peftcli decides pinning itself",
    "dataloader_persistent_workers": "peftcli uses no data-loader workers",
    "ddp_timeout": "set by peftcli's launcher",
    "ddp_find_unused_parameters": "set by peftcli's launcher",
    "save_only_model": "peftcli checkpoints are resumable and hold what resuming needs",
    "save_safetensors": "peftcli always writes safetensors",
    "overwrite_output_dir": "pass `peft train --overwrite` instead",
    "plot_loss": "peftcli writes its loss curve itself",
    "disable_tqdm": "peftcli shows progress only on a terminal",
    "log_level": "not a peftcli setting",
    "tf32": "peftcli leaves the TF32 matmul setting to torch",
    "use_cpu": "peftcli uses a GPU when there is one",
    "local_rank": "set by the launcher",
    "push_to_hub": "peftcli does not upload; push the run directory yourself",
    "hub_model_id": "peftcli does not upload; push the run directory yourself",
    "hub_strategy": "peftcli does not upload; push the run directory yourself",
    "gradient_checkpointing_kwargs": "peftcli picks the checkpointing variant itself (non-reentrant)",
}
NOT_SUPPORTED = {
    "resume_from_checkpoint": "resume with `peft train RECIPE --resume`",
    "lr_scheduler_kwargs": "peftcli's schedules take no extra options",
    "neftune_noise_alpha": "peftcli has no NEFTune noise",
    "label_smoothing_factor": "peftcli has no label smoothing",
    "load_best_model_at_end": "peftcli saves the final adapter; pick a checkpoint by its eval loss yourself",
    "metric_for_best_model": "peftcli saves the final adapter; pick a checkpoint by its eval loss yourself",
    "optim_args": "peftcli's optimizers take no extra options",
    "max_steps_per_epoch": "not a peftcli setting",
}
TRACKERS = ("wandb", "tensorboard", "mlflow")


def map_training_arguments(
    conv: Converter, tool_name: str, defaults: dict[str, Any], reasons: dict[str, str] | None = None
) -> None:
    """Map the TrainingArguments keys of `conv`'s source; `defaults` are the source tool's own (HF's when
    it does not change them), written out where they are not peftcli's; `reasons` replaces the default's
    stated reason for some keys."""

    def why(key: str) -> str:
        return (reasons or {}).get(key) or f"{tool_name}'s {key} default"

    max_steps = conv.take("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:  # HF's -1 means: run num_train_epochs
        conv.put("training.max_steps", max_steps)
        if conv.has("num_train_epochs"):
            conv.note("num_train_epochs", "max_steps is set and ends the run first; peftcli takes one of the two")
    else:
        conv.copy(
            "num_train_epochs", "training.epochs", defaults["num_train_epochs"], why("num_train_epochs"), convert=float
        )
    conv.copy(
        "per_device_train_batch_size",
        "training.batch_size",
        defaults["per_device_train_batch_size"],
        why("per_device_train_batch_size"),
    )
    conv.copy(
        "gradient_accumulation_steps",
        "training.gradient_accumulation",
        defaults["gradient_accumulation_steps"],
        why("gradient_accumulation_steps"),
    )
    conv.copy("learning_rate", "training.learning_rate", defaults["learning_rate"], why("learning_rate"), convert=float)
    conv.map_schedule("lr_scheduler_type", defaults["lr_scheduler_type"], why("lr_scheduler_type"))
    steps, ratio = conv.take("warmup_steps", 0), conv.take("warmup_ratio", 0)
    if steps:
        conv.put("training.warmup_steps", int(steps))
    elif ratio:
        conv.put("training.warmup_ratio", float(ratio))
    constant_means_no_warmup(conv, "lr_scheduler_type")
    conv.copy("weight_decay", "training.weight_decay", defaults["weight_decay"], why("weight_decay"), convert=float)
    conv.copy("max_grad_norm", "training.max_grad_norm", defaults["max_grad_norm"], why("max_grad_norm"), convert=float)
    conv.copy("seed", "training.seed", defaults["seed"], why("seed"))
    conv.map_optimizer("optim")
    _epsilon(conv)
    _betas(conv, (defaults["adam_beta1"], defaults["adam_beta2"]), why("adam_beta1/2"))
    _precision(conv, defaults["precision"], why("bf16/fp16"))
    conv.copy(
        "gradient_checkpointing",
        "training.activation_checkpointing",
        defaults["gradient_checkpointing"],
        why("gradient_checkpointing"),
        convert=bool,
    )
    conv.copy(
        "group_by_length", "data.group_by_length", defaults["group_by_length"], why("group_by_length"), convert=bool
    )
    if conv.take("torch_compile"):
        conv.put("training.compile", True)
    map_steps(conv, "logging_steps", "training.log_every")
    _evaluation(conv, defaults["eval_strategy"], defaults["eval_steps"], why("eval_steps"))
    _saving(conv, defaults["save_steps"], why("save_steps"))
    _trackers(conv)
    conv.map_deepspeed("deepspeed")
    conv.map_fsdp(["fsdp", "fsdp_config"])
    conv.copy("output_dir", "output.dir", defaults["output_dir"], why("output_dir"))
    for key, reason in NO_EFFECT.items():
        conv.no_effect(key, reason)
    for key, reason in NOT_SUPPORTED.items():
        if conv.has(key):
            conv.note(key, reason)


def _epsilon(conv: Converter) -> None:
    if conv.has("adam_epsilon") and float(conv.data["adam_epsilon"]) == ADAM_EPSILON:
        conv.no_effect("adam_epsilon", "peftcli's AdamW epsilon is the same 1e-8")
    elif conv.has("adam_epsilon"):
        conv.note("adam_epsilon", f"{conv.take('adam_epsilon')}: peftcli's AdamW epsilon is fixed at 1e-8")


def _betas(conv: Converter, default: tuple[float, float], why: str) -> None:
    beta1, beta2 = conv.take("adam_beta1"), conv.take("adam_beta2")
    if beta1 is not None or beta2 is not None:
        betas = [float(default[0] if beta1 is None else beta1), float(default[1] if beta2 is None else beta2)]
        conv.put("training.betas", betas)
    elif tuple(default) != BETAS:
        conv.put("training.betas", list(default))
        conv.defaults.append(("training.betas", list(default), why))


def _precision(conv: Converter, default: str, why: str) -> None:
    bf16, fp16 = conv.take("bf16"), conv.take("fp16")
    if bf16 is None and fp16 is None:
        conv.put("training.precision", default)
        conv.defaults.append(("training.precision", default, why))
    else:
        conv.put("training.precision", "bf16" if bf16 else "fp16" if fp16 else "fp32")
    if conv.take("pure_bf16"):
        conv.put("model.dtype", "bf16")


def _evaluation(conv: Converter, default_strategy: str, default_steps: int | None, why_steps: str) -> None:
    """Evaluation settings; `default_steps` None means the HF Trainer's fallback to logging_steps."""
    strategy = str(conv.take("eval_strategy", conv.take("evaluation_strategy", default_strategy)))
    if strategy == "no":
        if conv.has("eval_steps"):
            conv.note("eval_steps", "eval_strategy is no, so the source does not evaluate")
        return
    if not conv.get("data.validation"):
        if conv.has("eval_strategy") or conv.has("evaluation_strategy"):
            conv.note("eval_strategy", f"{strategy}: no validation data was mapped, so nothing is evaluated")
        conv.used.add("eval_steps")
        return
    conv.copy(
        "eval_on_start", "training.eval_at_start", False, "HF TrainingArguments' eval_on_start default", convert=bool
    )
    if strategy == "steps":
        if conv.has("eval_steps"):
            map_steps(conv, "eval_steps", "training.eval_every")
        elif default_steps is not None:
            conv.copy("eval_steps", "training.eval_every", default_steps, why_steps)
        elif conv.get("training.log_every"):
            conv.put("training.eval_every", conv.get("training.log_every"))  # HF falls back to logging_steps
    else:
        conv.note(
            "eval_strategy",
            f"{strategy}: peftcli evaluates every training.eval_every steps and at the "
            "end; the recipe evaluates at the end only",
        )


def _saving(conv: Converter, default: int, why: str) -> None:
    strategy = str(conv.take("save_strategy", "steps"))
    if strategy == "no":
        conv.used.add("save_steps")
    elif strategy == "steps":
        if conv.has("save_steps"):
            map_steps(conv, "save_steps", "training.save_every")
        else:
            conv.copy("save_steps", "training.save_every", default, why)
    else:
        conv.note("save_strategy", f"{strategy}: peftcli checkpoints every training.save_every steps; set it")
    if conv.has("save_total_limit"):
        conv.put("training.keep_checkpoints", int(conv.take("save_total_limit")))
    elif conv.get("training.save_every"):
        conv.note(
            "save_total_limit",
            "unset: the HF Trainer keeps every checkpoint; peftcli keeps the newest training.keep_checkpoints (2)",
        )


def _trackers(conv: Converter) -> None:
    value = conv.take("report_to")
    names = [value] if isinstance(value, str) else list(value or [])
    kept = [n for n in names if n in TRACKERS]
    others = [n for n in names if n not in TRACKERS and n != "none"]
    if kept:
        conv.put("training.report_to", kept)
        if conv.has("run_name"):
            conv.put("training.tracking.run_name", str(conv.take("run_name")))
    else:
        conv.no_effect("run_name", "no tracker in report_to")
    if others:
        conv.note("report_to", f"{', '.join(others)}: peftcli reports to {', '.join(TRACKERS)} only")
