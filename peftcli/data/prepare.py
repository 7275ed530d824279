"""From recipe to tokenized train/validation sets, with the checks that must fail before training starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftcli.data.formats import IGNORE_INDEX, Renderer, truncate
from peftcli.data.sources import load_source
from peftcli.errors import DataError
from peftcli.recipe.schema import DataSource, Recipe, SplitValidation


@dataclass
class SplitStats:
    """What happened to one split on its way to token ids."""

    examples: int = 0
    dropped_no_labels: int = 0
    truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0


@dataclass
class PreparedData:
    """Tokenized splits (columns input_ids, labels) and their statistics."""

    train: object
    validation: object | None
    stats: dict[str, SplitStats] = field(default_factory=dict)


def _tokenize(dataset, renderer: Renderer, max_length: int, key: str):
    renderer.check_columns(list(dataset.column_names))

    def render(row: dict, index: int) -> dict:
        return truncate(renderer(row, index), max_length)

    tokenized = dataset.map(
        render, with_indices=True, remove_columns=list(dataset.column_names), desc=f"tokenizing {key}"
    )
    label_counts = [sum(1 for x in labels if x != IGNORE_INDEX) for labels in tokenized["labels"]]
    stats = SplitStats(
        examples=len(tokenized),
        truncated=sum(tokenized["truncated"]),
        tokens=sum(len(ids) for ids in tokenized["input_ids"]),
        label_tokens=sum(label_counts),
    )
    keep = [i for i, n in enumerate(label_counts) if n > 0]
    stats.dropped_no_labels = len(tokenized) - len(keep)
    if not keep:
        raise DataError(
            f"{key}: every example has all its labels masked (no completion or assistant tokens within "
            f"data.max_length={max_length}); check the format and columns, or raise max_length"
        )
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns(["truncated"]), stats


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Load, split, tokenize and check the recipe's data."""
    data = recipe.data
    raw_train = load_source(data.train, "data.train")
    raw_validation = None
    validation_source: DataSource | None = None
    if isinstance(data.validation, SplitValidation):
        held_out = max(1, round(len(raw_train) * data.validation.fraction))
        if held_out >= len(raw_train):
            raise DataError(
                f"data.validation.fraction: {data.validation.fraction} of {len(raw_train)} examples leaves "
                "nothing to train on"
            )
        seed = data.shuffle_seed if data.shuffle_seed is not None else recipe.training.seed
        split = raw_train.train_test_split(test_size=held_out, seed=seed, shuffle=True)
        raw_train, raw_validation = split["train"], split["test"]
        validation_source = data.train
    elif isinstance(data.validation, DataSource):
        raw_validation = load_source(data.validation, "data.validation")
        validation_source = data.validation

    train, train_stats = _tokenize(
        raw_train, Renderer(data.train, tokenizer, data.mask_prompt, "data.train"), data.max_length, "data.train"
    )
    stats = {"train": train_stats}
    validation = None
    if raw_validation is not None:
        key = "data.validation" if isinstance(data.validation, DataSource) else "data.train"
        renderer = Renderer(validation_source, tokenizer, data.mask_prompt, key)
        validation, stats["validation"] = _tokenize(raw_validation, renderer, data.max_length, "data.validation")
    return PreparedData(train=train, validation=validation, stats=stats)
