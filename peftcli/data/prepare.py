"""From recipe to tokenized train/validation sets, with the checks that must fail before training starts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peftcli.data.formats import IGNORE_INDEX, Renderer, label_name, sorted_label_names, truncate
from peftcli.data.sources import load_source
from peftcli.errors import DataError
from peftcli.recipe.schema import CLASSIFICATION_TASKS, DataSource, Recipe, SplitValidation


@dataclass
class SplitStats:
    """What happened to one split on its way to token ids."""

    examples: int = 0
    dropped_no_labels: int = 0
    truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0  # tokens that carry a label; seq_cls: one per example
    label_counts: dict[str, int] = field(default_factory=dict)  # seq_cls/token_cls: labels seen, by name


@dataclass
class PreparedData:
    """Tokenized splits (columns input_ids, labels, and token_type_ids where the tokenizer makes them).

    `label_names` are the classes of seq_cls and token_cls in id order (None for the generative tasks).
    """

    train: object
    validation: object | None
    stats: dict[str, SplitStats] = field(default_factory=dict)
    label_names: list[str] | None = None
    truncated: dict[str, list[bool]] = field(default_factory=dict)  # per split: was each kept example cut?


def _label_count(labels) -> int:
    if isinstance(labels, int):
        return 1  # seq_cls: one label per example
    return sum(1 for x in labels if x != IGNORE_INDEX)


def _tokenize(dataset, renderer: Renderer, max_length: int, key: str, label_names: list[str] | None, progress=None):
    renderer.check_columns(list(dataset.column_names))

    def render(row: dict, index: int) -> dict:
        return truncate(renderer(row, index), max_length)

    if renderer.source.format == "unpaired_preference":
        # The kl estimate's mismatched rows are fixed here, independent of batching and processes: example i
        # of the split gets the completion of example (i + 1) mod N (a single example gets its own).
        completions = dataset[renderer.column("completion")]

        def render(row: dict, index: int) -> dict:
            other = (index + 1) % len(completions)
            return truncate(renderer.render_unpaired(row, index, (other, completions[other])), max_length)

    shown = render if progress is None else _reporting(render, key, len(dataset), progress)
    tokenized = dataset.map(
        shown, with_indices=True, remove_columns=list(dataset.column_names), desc=f"tokenizing {key}"
    )
    all_labels = tokenized["labels"]
    label_counts = [_label_count(labels) for labels in all_labels]
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    for second in ("rejected", "mismatched"):  # preference pairs, or unpaired examples: both rows need a completion
        if f"{second}_labels" in tokenized.column_names:
            other = [_label_count(labels) for labels in tokenized[f"{second}_labels"]]
            tokens += sum(len(ids) for ids in tokenized[f"{second}_input_ids"])
            label_counts = [min(a, b) and a + b for a, b in zip(label_counts, other, strict=True)]
    cut = tokenized["truncated"]
    stats = SplitStats(
        examples=len(tokenized),
        truncated=sum(cut),
        tokens=tokens,
        label_tokens=sum(label_counts),
    )
    if label_names is not None:
        ids = Counter(x for labels in all_labels for x in ([labels] if isinstance(labels, int) else labels))
        stats.label_counts = {name: ids.get(i, 0) for i, name in enumerate(label_names)}
    keep = [i for i, n in enumerate(label_counts) if n > 0]
    stats.dropped_no_labels = len(tokenized) - len(keep)
    if not keep:
        raise DataError(
            f"{key}: every example has all its labels masked (no completion, assistant or labelled word tokens "
            f"within data.max_length={max_length}); check the format and columns, or raise max_length"
        )
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns(["truncated"]), stats, [cut[i] for i in keep]


def _reporting(render, key: str, total: int, progress):
    """`render`, telling `progress(key, done, total)` after each example (the caller decides what to show)."""

    def counted(row: dict, index: int) -> dict:
        result = render(row, index)
        progress(key, index + 1, total)
        return result

    return counted


def _labels_in(dataset, renderer: Renderer) -> list:
    """Every label value of a classification source (the tags of every word for token_classification)."""
    renderer.check_columns(list(dataset.column_names))
    if renderer.source.format == "token_classification":
        values = [tag for tags in dataset[renderer.column("tags")] if isinstance(tags, list) for tag in tags]
    else:
        values = list(dataset[renderer.column("label")])
    return [v for v in values if v is not None]  # an empty label is reported, with its example, when rendering


def _label_names(recipe: Recipe, raw_train, renderer: Renderer) -> tuple[list[str], str]:
    """The class names in id order, and where they came from (for messages)."""
    if recipe.data.labels is not None:
        return [label_name(v) for v in recipe.data.labels], "data.labels"
    names = sorted_label_names(_labels_in(raw_train, renderer))
    if len(names) < 2:
        found = names[0] if names else "none"
        raise DataError(
            f"data.train: {recipe.data.train.path}: a classifier needs at least two labels; the data has {found}"
        )
    return names, "data.train"


def prepare_data(recipe: Recipe, tokenizer, progress=None) -> PreparedData:
    """Load, split, tokenize and check the recipe's data; `progress(key, done, total)` hears of each example."""
    data = recipe.data
    task = recipe.model.task
    raw_train = load_source(data.train, "data.train")

    def renderer_for(source: DataSource, key: str) -> Renderer:
        return Renderer(source, tokenizer, data.mask_prompt, key, task=task, max_length=data.max_length)

    train_renderer = renderer_for(data.train, "data.train")
    label_names = None
    if task in CLASSIFICATION_TASKS:
        # Taken before a validation share is held out, so both sides of the split use the same classes.
        label_names, labels_from = _label_names(recipe, raw_train, train_renderer)
        train_renderer.label_ids = {name: i for i, name in enumerate(label_names)}
        train_renderer.labels_from = labels_from

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

    train, train_stats, train_cut = _tokenize(
        raw_train, train_renderer, data.max_length, "data.train", label_names, progress
    )
    stats, truncated = {"train": train_stats}, {"train": train_cut}
    validation = None
    if raw_validation is not None:
        key = "data.validation" if isinstance(data.validation, DataSource) else "data.train"
        renderer = renderer_for(validation_source, key)
        renderer.label_ids, renderer.labels_from = train_renderer.label_ids, train_renderer.labels_from
        validation, stats["validation"], truncated["validation"] = _tokenize(
            raw_validation, renderer, data.max_length, "data.validation", label_names, progress
        )
    return PreparedData(train=train, validation=validation, stats=stats, label_names=label_names, truncated=truncated)
