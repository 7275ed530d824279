"""`peft eval`: a run's validation data (or any file rendered with its recipe) scored by the loop's own functions.

The numbers are the loop's: evaluate_loss (loss with perplexity, accuracy, or the preference metrics) under
the precision the run trained with, and generation_score when the recipe has training.eval_generation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from peftcli.errors import DataError, PeftCliError
from peftcli.serve.load import LoadedModel, classify, load_run


@dataclass
class DataChoice:
    """What `peft eval` scores: the run's validation split (path None) or a file, and how to read it."""

    path: str | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_samples: int | None = None
    batch_size: int | None = None


def parse_columns(items: list[str]) -> dict[str, str]:
    """['prompt=question', 'completion=answer'] (or one 'a=b,c=d') -> {prompt: question, completion: answer}."""
    columns = {}
    for item in (part for text in items for part in text.split(",") if part.strip()):
        field_name, sep, column = item.partition("=")
        if not sep or not field_name.strip() or not column.strip():
            raise PeftCliError(f"--columns {item}: expected FIELD=COLUMN, e.g. --columns prompt=question")
        columns[field_name.strip()] = column.strip()
    return columns


def eval_recipe(run: Path, choice: DataChoice, base: str | None):
    """The recipe eval renders data with: the run's own, with --data/--format/--columns in place of its data.

    A bare merged directory has no recipe: --data and --format describe the file, rendered with the defaults.
    """
    from peftcli.recipe.load import validate_recipe_dict
    from peftcli.recipe.schema import TASK_FORMATS, DataSection, EvalGeneration
    from peftcli.train.run_dir import label_names, read_recipe

    if choice.path is not None and not Path(choice.path).exists():
        raise DataError(f"--data: {choice.path} not found")
    kind = classify(run)
    # An adapter trained elsewhere, or one `peft merge --combine` wrote, has no training recipe (at most its base).
    recipe_less = kind == "run" and not (read_recipe(run).get("method") and read_recipe(run).get("data"))
    if kind == "merged" or recipe_less:
        if choice.path is None or choice.format is None:
            what = "a merged model directory" if kind == "merged" else "an adapter directory without a training recipe"
            hint = " (or evaluate the run directory with --merged)" if kind == "merged" else ""
            raise PeftCliError(
                f"{run}: {what} holds no recipe, so no validation data; pass --data FILE and --format F{hint}"
            )
        source = {"path": choice.path, "format": choice.format, "columns": choice.columns}
        source.update({"max_samples": choice.max_samples} if choice.max_samples else {})
        data = _checked(lambda: DataSection(train=source), "--data")
        return SimpleNamespace(data=data, model=SimpleNamespace(task=None), training=SimpleNamespace(seed=0,
                               eval_generation=None, precision="auto"), objective=None)  # fmt: skip
    raw = copy.deepcopy(read_recipe(run))
    if base is not None:
        raw.setdefault("model", {})["name_or_path"] = base
    if choice.path is not None:
        data = raw.setdefault("data", {})
        train = data.get("train") or {}
        if isinstance(train, list):  # a mixed run: the file is read like its first source unless told otherwise
            train = {k: v for k, v in train[0].items() if k not in ("weight", "samples")}
        train = dict(train)
        if choice.format is not None and choice.format != train.get("format"):
            train["columns"] = {}  # the run's column names belong to its own format
        train.update(path=choice.path, max_samples=choice.max_samples)  # only the rows scored are read
        train.update({"format": choice.format} if choice.format else {})
        train["columns"] = {**train.get("columns", {}), **choice.columns}
        data.update(train=train, validation=None)
        names = label_names(run)
        if names:  # the class ids the head was trained with, whatever labels the file holds
            data["labels"] = names
        # The file takes the place of the validation data, which the recipe's evaluation settings require.
        training = raw.setdefault("training", {})
        training["eval_every"], generation = None, training.pop("eval_generation", None)
        recipe = validate_recipe_dict(raw, str(run / "recipe.yaml"))
        if generation is not None:
            gen = EvalGeneration(**generation)
            recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"eval_generation": gen})})
        if recipe.data.train.format not in TASK_FORMATS[recipe.model.task]:
            raise PeftCliError(
                f"--format: {recipe.data.train.format} is not a format of model.task {recipe.model.task}"
            )
        return recipe
    elif choice.format or choice.columns:
        raise PeftCliError("--format and --columns describe a --data file; without --data the run's own data is used")
    elif not (raw.get("data") or {}).get("validation"):
        raise PeftCliError(f"{run}: the run has no validation data (data.validation); pass --data FILE")
    return validate_recipe_dict(raw, str(run / "recipe.yaml"))


def _checked(build: Callable, where: str):
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:])
        raise PeftCliError(
            f"{where}: {loc + ': ' if loc else ''}{first['msg'].removeprefix('Value error, ')}"
        ) from None


def _collator(dataset, pad_id: int):
    """The loop's collator for these columns: pairs and unpaired examples keep their two rows together."""
    from peftcli.data.collate import PadCollator, PairCollator, UnpairedCollator

    if "rejected_input_ids" in dataset.column_names:
        return PairCollator(pad_id)
    if "mismatched_input_ids" in dataset.column_names:
        return UnpairedCollator(pad_id)
    return PadCollator(pad_id)


class _Counted:
    """A data loader that says how far it got, every `every` batches and at the end."""

    def __init__(self, loader, report: Callable[[int, int], None], every: int):
        self.loader, self.report, self.every = loader, report, max(1, every)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        total = len(self.loader)
        for done, batch in enumerate(self.loader, start=1):
            yield batch
            if done % self.every == 0 or done == total:
                self.report(done, total)


def evaluate_run(
    run: Path,
    choice: DataChoice,
    merged: Path | None = None,
    base: str | None = None,
    progress: Callable[[str], None] = lambda text: None,
) -> dict:
    """Score a run (or merged model) on its validation data or `choice`'s file; the loop's metrics as a dict."""
    recipe = eval_recipe(run, choice, base)
    bare = isinstance(recipe, SimpleNamespace)
    progress(f"loading {run}" + (f" with the merged model {merged}" if merged else ""))
    loaded = load_run(run, merged=merged, base=base, scoring=None if bare else recipe)
    if bare:
        recipe.model.task = loaded.task
    objective = _objective(loaded, recipe)
    dataset = _dataset(loaded, recipe, choice, progress)
    return _score(loaded, recipe, objective, dataset, choice, progress)


def _objective(loaded: LoadedModel, recipe):
    from peftcli.objectives.registry import get_objective
    from peftcli.train.objective import TaskObjective

    if loaded.objective is not None:
        return loaded.objective
    name = getattr(recipe.objective, "name", None)
    if name is not None and get_objective(name).capabilities.preference_data:
        raise PeftCliError(
            f"{loaded.describe}: objective {name} compares with the adapter the run started from, which a merged "
            "model no longer holds; evaluate the run directory without --merged"
        )
    return TaskObjective(loaded.task, loaded.model.config)


def _dataset(loaded: LoadedModel, recipe, choice: DataChoice, progress):
    from peftcli.data.prepare import prepare_data

    what = choice.path or "the run's validation data"
    progress(f"tokenizing {what}")
    data = prepare_data(recipe, loaded.tokenizer)
    dataset = data.train if choice.path is not None else data.validation
    if choice.max_samples is not None and choice.max_samples < len(dataset):
        dataset = dataset.select(range(choice.max_samples))
    return dataset


def _score(loaded: LoadedModel, recipe, objective, dataset, choice: DataChoice, progress) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peftcli.train.evaluate import evaluate_loss, generation_score, prompt_ids
    from peftcli.train.loop import resolve_precision

    batch_size = choice.batch_size or getattr(getattr(recipe, "training", None), "batch_size", 8)
    accelerator = Accelerator(mixed_precision=resolve_precision(recipe.training.precision))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=_collator(dataset, loaded.tokenizer.pad_token_id))
    model, loader = accelerator.prepare(loaded.model, loader)
    total = len(loader)
    progress(f"scoring {len(dataset)} examples in {total} batches of {batch_size}")

    def report(done: int, total: int) -> None:
        progress(f"scored {done}/{total} batches")

    result = evaluate_loss(model, _Counted(loader, report, max(1, total // 10)), accelerator, objective)
    result["examples"] = len(dataset)
    gen = recipe.training.eval_generation
    if gen is not None:
        shown = range(min(gen.prompts, len(dataset)))
        if loaded.task == "seq2seq":  # the whole encoder input is the prompt, as in the loop
            prompts = [list(dataset[i]["input_ids"]) for i in shown]
        else:
            prompts = [prompt_ids(dataset[i]) for i in shown]
        if all(prompts):
            progress(f"answering {len(prompts)} prompts (up to {gen.max_new_tokens} new tokens each)")
            with accelerator.autocast():
                scored, _ = generation_score(loaded.model, loaded.tokenizer, prompts, gen.max_new_tokens, gen.pattern)
            result.update(scored)
        else:  # labels from the first token (format text, or mask_prompt off): no prompt to answer
            progress("note: no generation score: these examples have no prompt before their labels")
    accelerator.end_training()
    return result
