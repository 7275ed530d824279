"""From recipe to tokenized train/validation sets, with the checks that must fail before training starts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peftcli.data.formats import IGNORE_INDEX, Renderer, label_name, sorted_label_names, truncate
from peftcli.data.mix import TRAIN_ORDER, VALIDATION_ORDER, draw_rows, mix_counts, mixed_order
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
    mix: list[dict] = field(default_factory=list)  # train: what each source gave, after dropping (see _mix_row)


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


def _label_names(recipe: Recipe, raws: list, renderers: list[Renderer]) -> tuple[list[str], str]:
    """The class names in id order (of every training source together), and where they came from."""
    if recipe.data.labels is not None:
        return [label_name(v) for v in recipe.data.labels], "data.labels"
    names = sorted_label_names(v for raw, r in zip(raws, renderers, strict=True) for v in _labels_in(raw, r))
    if len(names) < 2:
        found = names[0] if names else "none"
        paths = ", ".join(r.source.path for r in renderers)
        raise DataError(f"data.train: {paths}: a classifier needs at least two labels; the data has {found}")
    return names, "data.train"


def prepare_data(recipe: Recipe, tokenizer, progress=None) -> PreparedData:
    """Load, split, tokenize and check the recipe's data; `progress(key, done, total)` hears of each example."""
    data = recipe.data
    task = recipe.model.task
    if data.mixed:
        return _prepare_mix(recipe, tokenizer, progress)
    raw_train = load_source(data.train, "data.train")

    def renderer_for(source: DataSource, key: str) -> Renderer:
        return Renderer(source, tokenizer, data.mask_prompt, key, task=task, max_length=data.max_length)

    train_renderer = renderer_for(data.train, "data.train")
    label_names = None
    if task in CLASSIFICATION_TASKS:
        # Taken before a validation share is held out, so both sides of the split use the same classes.
        label_names, labels_from = _label_names(recipe, [raw_train], [train_renderer])
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
    held = len(validation) if validation is not None and isinstance(data.validation, SplitValidation) else 0
    train_stats.mix = _shares([_mix_row("data.train", data.train, train, train_stats, len(raw_train), held=held)])
    return PreparedData(train=train, validation=validation, stats=stats, label_names=label_names, truncated=truncated)


# --- a list of training sources (the rule of how many examples each gives is in data/mix.py) -------------------


def _prepare_mix(recipe: Recipe, tokenizer, progress=None) -> PreparedData:
    """data.train as a list: each source loaded, split and rendered as its own (format, columns, prompt style),
    drawn into one mix, and interleaved by the seed. A validation fraction is held out of each source's rows
    before drawing, so no row is in both splits even when a source repeats."""
    data, task = recipe.data, recipe.model.task
    seed = data.shuffle_seed if data.shuffle_seed is not None else recipe.training.seed
    sources = data.train_sources()
    raws = [load_source(source, key) for key, source in sources]
    renderers = [
        Renderer(source, tokenizer, data.mask_prompt, key, task=task, max_length=data.max_length)
        for key, source in sources
    ]
    label_names = None
    if task in CLASSIFICATION_TASKS:  # the union of every source's labels
        label_names, labels_from = _label_names(recipe, raws, renderers)
        for renderer in renderers:
            renderer.label_ids = {name: i for i, name in enumerate(label_names)}
            renderer.labels_from = labels_from
    held_out = [None] * len(raws)
    if isinstance(data.validation, SplitValidation):
        for i, (key, _) in enumerate(sources):
            raws[i], held_out[i] = _hold_out(raws[i], data.validation.fraction, seed, key)
    keys = [key for key, _ in sources]
    counts = mix_counts(
        [len(raw) for raw in raws], [s.weight for _, s in sources], [s.samples for _, s in sources], keys
    )
    parts, cuts, all_stats, rows = [], [], [], []
    for i, ((key, source), raw, renderer) in enumerate(zip(sources, raws, renderers, strict=True)):
        drawn = raw.select(draw_rows(len(raw), counts[i], seed, i))
        part, part_stats, cut = _tokenize(drawn, renderer, data.max_length, key, label_names, progress)
        parts.append(part)
        cuts.append(cut)
        all_stats.append(part_stats)
        rows.append(_mix_row(key, source, part, part_stats, len(raw), drawn=counts[i]))
    train, train_cut = _interleaved(parts, cuts, seed, TRAIN_ORDER)
    stats, truncated = {"train": _combined(all_stats)}, {"train": train_cut}

    validation = None
    if any(held is not None for held in held_out):
        parts, cuts, all_stats = [], [], []
        for row, held, renderer in zip(rows, held_out, renderers, strict=True):
            key = f"data.validation from {renderer.key}"
            part, part_stats, cut = _tokenize(held, renderer, data.max_length, key, label_names, progress)
            parts.append(part)
            cuts.append(cut)
            all_stats.append(part_stats)
            row["validation_examples"] = len(part)
        validation, truncated["validation"] = _interleaved(parts, cuts, seed, VALIDATION_ORDER)
        stats["validation"] = _combined(all_stats)
    elif isinstance(data.validation, DataSource):
        renderer = Renderer(
            data.validation, tokenizer, data.mask_prompt, "data.validation", task=task, max_length=data.max_length
        )
        renderer.label_ids, renderer.labels_from = renderers[0].label_ids, renderers[0].labels_from
        raw = load_source(data.validation, "data.validation")
        validation, stats["validation"], truncated["validation"] = _tokenize(
            raw, renderer, data.max_length, "data.validation", label_names, progress
        )
    stats["train"].mix = _shares(rows)
    return PreparedData(train=train, validation=validation, stats=stats, label_names=label_names, truncated=truncated)


def _hold_out(raw, fraction: float, seed: int, key: str):
    """(train, validation) rows of one source: the seeded fraction held out, at least one row."""
    held = max(1, round(len(raw) * fraction))
    if held >= len(raw):
        raise DataError(
            f"data.validation.fraction: {fraction} of the {len(raw)} examples of {key} leaves nothing to train on"
        )
    split = raw.train_test_split(test_size=held, seed=seed, shuffle=True)
    return split["train"], split["test"]


def _interleaved(parts: list, cuts: list[list[bool]], seed: int, stream: int):
    """The sources' tokenized examples as one dataset in a seeded order, and their truncation flags with them."""
    import datasets

    joined = datasets.concatenate_datasets(parts)
    order = mixed_order(len(joined), seed, stream)
    cut = [flag for part in cuts for flag in part]
    return joined.select(order).flatten_indices(), [cut[i] for i in order]


def _combined(parts: list[SplitStats]) -> SplitStats:
    """The stats of a split made of several sources."""
    total = SplitStats()
    for part in parts:
        for name in ("examples", "dropped_no_labels", "truncated", "tokens", "label_tokens"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        for label, count in part.label_counts.items():
            total.label_counts[label] = total.label_counts.get(label, 0) + count
    return total


def _trained_tokens(split) -> int:
    """Tokens of the examples kept (both rows of a preference pair or an unpaired example)."""
    columns = [c for c in ("input_ids", "rejected_input_ids", "mismatched_input_ids") if c in split.column_names]
    return sum(len(ids) for column in columns for ids in split[column])


def _mix_row(key: str, source: DataSource, part, stats: SplitStats, rows: int, drawn: int | None = None, held=0):
    """What one source gave the training set: `rows` it had (after max_samples and a held-out share), `drawn`
    of them (with repeats when more), and the examples and tokens kept after truncation and dropping."""
    drawn = rows if drawn is None else drawn
    return {
        "source": key,  # its path is added by mix_with_paths: the tokenized-data cache knows sources by content
        "format": source.format,
        "weight": getattr(source, "weight", None),
        "samples": getattr(source, "samples", None),
        "rows": rows,
        "drawn": drawn,
        "repeated": drawn > rows,
        "examples": len(part),
        "truncated": stats.truncated,
        "dropped_no_labels": stats.dropped_no_labels,
        "tokens": _trained_tokens(part),
        "label_tokens": stats.label_tokens,
        "validation_examples": held,
    }


def mix_with_paths(recipe: Recipe, stats: SplitStats) -> list[dict]:
    """The realised mix of the train split, each source with its path."""
    sources = dict(recipe.data.train_sources())
    return [{"source": row["source"], "path": sources[row["source"]].path, **row} for row in stats.mix]


def _shares(rows: list[dict]) -> list[dict]:
    """Each source's share of the examples, of their tokens and of their label tokens (loss-bearing)."""
    for name in ("examples", "tokens", "label_tokens"):
        total = sum(row[name] for row in rows)
        for row in rows:
            row[f"{name}_share"] = row[name] / total if total else 0.0
    return rows
