"""One loader for `peft eval`, `generate` and `chat`: a finished run (its base + its adapter) or a merged model.

    runs/my-run            recipe.yaml + adapter_config.json: the base from the recipe, the adapter loaded onto it
    runs/my-run-merged     config.json + weights (from `peft merge`): loaded as it is
    runs/my-run --merged runs/my-run-merged   the merged weights, with the run's recipe for data and prompts

The model is loaded as training loaded it (the recipe's dtype, attention, task head and quantization), so
what `peft eval` measures is what the loop measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.errors import AdapterError, ModelError, PeftCliError

# What a merged directory's architecture name ends with, for each task.
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "causal_lm"),
    ("ForSequenceClassification", "seq_cls"),
    ("ForTokenClassification", "token_cls"),
    ("ForConditionalGeneration", "seq2seq"),
    ("ForSeq2SeqLM", "seq2seq"),
)


@dataclass
class LoadedModel:
    """A model ready to answer or be scored, and what it came from."""

    model: Any
    tokenizer: Any
    source: Path  # the run directory, or the merged directory when there is no run
    merged: bool  # the weights came from a merged directory
    task: str
    recipe: dict = field(default_factory=dict)  # the run's saved recipe as plain data ({}: a bare merged directory)
    label_names: list[str] | None = None
    objective: Any = None  # set by load_for_eval: the run's objective over this model

    @property
    def describe(self) -> str:
        return f"{self.source} ({'merged model' if self.merged else 'base + adapter'})"


def classify(path: Path) -> str:
    """'run' (a finished run or adapter directory) or 'merged' (a model directory); anything else is refused."""
    from peftcli.train.run_dir import is_run_dir, unfinished_run
    from peftcli.tuners.adapter import CONFIG_NAME

    if not path.exists():
        raise PeftCliError(f"{path}: not found; give a run directory (peft train) or a merged model (peft merge)")
    if not path.is_dir():
        raise PeftCliError(f"{path}: is a file; give a run directory (peft train) or a merged model (peft merge)")
    unfinished = unfinished_run(path)
    if unfinished:
        raise AdapterError(unfinished)
    if (path / CONFIG_NAME).is_file():
        return "run"
    if (path / "config.json").is_file() and not is_run_dir(path):
        return "merged"
    raise PeftCliError(
        f"{path}: neither a finished run directory (recipe.yaml and adapter_config.json) nor a merged model "
        "directory (config.json and weights); give one written by peft train or peft merge"
    )


def _task_of_merged(path: Path) -> str:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    for architecture in config.get("architectures") or []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    return "causal_lm"


def _model_section(run_dir: Path, base: str | None):
    """The run's model section as training used it: model_section, with its quantization kept."""
    from peftcli.recipe.schema import ModelSection
    from peftcli.train.run_dir import model_section, read_recipe

    section = model_section(run_dir, base)
    quantization = (read_recipe(run_dir).get("model") or {}).get("quantization")
    if quantization:  # the loop evaluated on the quantized base: so does eval
        section = ModelSection(**{**section.model_dump(), "quantization": quantization})
    return section


def _tokenizer(directory: Path, fallback_section):
    """The tokenizer saved beside the weights or adapter (the one training used), else the base's."""
    from transformers import AutoTokenizer

    from peftcli.models.load import ensure_pad_token, load_tokenizer

    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ensure_pad_token(tokenizer)
        return tokenizer
    if fallback_section is None:
        raise ModelError(f"{directory}: no tokenizer files; copy the base model's tokenizer into it")
    return load_tokenizer(fallback_section)


def _place(model):
    """On this machine's GPU when there is one (a quantized model was placed while loading)."""
    from peftcli.models.load import default_device

    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        model.to(default_device())
    return model.eval()


def load_run(path: Path, merged: Path | None = None, base: str | None = None, scoring=None) -> LoadedModel:
    """Load RUN (a run directory or a merged model directory), or a run's recipe with `merged` weights.

    `scoring` (the validated recipe eval scores with) asks for the run's objective over the loaded model too;
    a preference objective takes its reference from the adapter the run started from, so it is built before
    the trained tensors go in (see _load_adapter).
    """
    from peftcli.models.load import load_base_model
    from peftcli.train.run_dir import label_names, read_recipe

    kind = classify(path)
    if kind == "merged":
        if merged is not None:
            raise PeftCliError(f"--merged: {path} is a merged model already; give a run directory with --merged")
        return _load_merged(path, path, {}, None)
    recipe = read_recipe(path)
    names = label_names(path)
    if merged is not None:
        if classify(merged) != "merged":
            raise PeftCliError(f"--merged: {merged} is not a merged model directory (config.json and weights)")
        return _load_merged(merged, path, recipe, names)
    section = _model_section(path, base)
    tokenizer = _tokenizer(path, section)
    model = load_base_model(section, **({"label_names": names} if names else {}))
    objective = _load_adapter(model, path, tokenizer, scoring)
    loaded = LoadedModel(_place(model), tokenizer, path, False, section.task, recipe, names)
    loaded.objective = objective
    return loaded


def _load_merged(directory: Path, source: Path, recipe: dict, names: list[str] | None) -> LoadedModel:
    from peftcli.models.load import load_base_model
    from peftcli.recipe.schema import ModelSection

    model_part = recipe.get("model") or {}
    task = model_part.get("task") or _task_of_merged(directory)
    section = ModelSection(
        name_or_path=str(directory),
        dtype=model_part.get("dtype", "auto"),
        attn_implementation=model_part.get("attn_implementation", "auto"),
        task=task,
    )
    tokenizer = _tokenizer(directory, section)
    model = load_base_model(section, **({"label_names": names} if names else {}))
    return LoadedModel(_place(model), tokenizer, source, True, task, recipe, names)


def _load_adapter(model, run_dir: Path, tokenizer, scoring):
    """Put the run's adapter on `model`; returns the run's objective over it when `scoring` asks for one.

    A preference objective compares with the policy the run started from: the method applied afresh (seeded
    as training seeded it), or the adapter the run continued. That is snapshotted first, then the trained
    tensors replace it.
    """
    from peftcli.objectives.registry import get_objective
    from peftcli.train.loop import build_objective
    from peftcli.tuners.adapter import load_adapter

    if scoring is None or not get_objective(scoring.objective.name).capabilities.preference_data:
        load_adapter(model, run_dir, tokenizer)
        return None if scoring is None else build_objective(scoring, model)
    import torch

    from peftcli.train.run_dir import read_summary
    from peftcli.tuners.adapter import apply_adapter, continue_adapter, load_adapter_tensors, read_adapter_weights
    from peftcli.tuners.protocol import AdapterContext

    torch.manual_seed(scoring.training.seed)
    steps = int(read_summary(run_dir).get("total_steps") or 1)
    context = AdapterContext(task=scoring.model.task, tokenizer=tokenizer, total_steps=steps)
    info = apply_adapter(model, scoring.method, context)
    if scoring.model.adapter is not None:
        continue_adapter(model, scoring.model.adapter)
    objective = build_objective(scoring, model, "live")  # snapshots the starting policy
    load_adapter_tensors(model, read_adapter_weights(run_dir))
    named = dict(model.named_parameters())
    for name in info.param_names:
        named[name].requires_grad_(False)
    return objective
