"""The data side of the Oumi importer: its SFT dataset classes (datasets/sft/*.py), how its collators decide
which tokens are trained, mixtures, sample counts, packing and the maximum length, checked against oumi-ai/oumi at
d8ed077 (src/oumi/core/configs/params/data_params.py, src/oumi/builders/data.py)."""

from __future__ import annotations

from typing import Any

from peftcli.recipe.importers.common import Converter, finish_sources, first_record, make_source
from peftcli.recipe.importers.result import ConfigImportError

# TRL's SFTConfig max_length, which Oumi's TRL_SFT trainer keeps when neither model_max_length nor
# trainer_kwargs sets one (core/configs/training_config.py copies model_max_length into trainer_kwargs)
TRL_MAX_LENGTH = 1024
# datasets/sft/*.py: Oumi's SFT dataset classes whose rows peftcli reads, by registered name
ALPACA_DATASETS = ("yahma/alpaca-cleaned", "tatsu-lab/alpaca")
CHAT_DATASETS = ("HuggingFaceH4/ultrachat_200k", "allenai/tulu-3-sft-mixture")
TEXT_SFT = ("text_sft", "text_sft_jsonl")
COMPLETIONS_COLLATOR = "text_completions_only_with_padding"


def map_data(conv: Converter, trainer: str) -> None:
    """The data section, and the model and trainer keys that shape the examples."""
    split = "data.train"
    datasets = conv.take(f"{split}.datasets") or []
    sources = [_dataset(conv, f"{split}.datasets[{i}]", entry) for i, entry in enumerate(datasets)]
    conv.sources = [source for source in sources if source]
    weights = [source.get("weight") for source in conv.sources]
    if any(weight is not None for weight in weights) and not all(weight is not None for weight in weights):
        for source in conv.sources:  # a mix needs every weight or none: drop the partial set
            source.pop("weight", None)
    strategy = str(conv.take(f"{split}.mixture_strategy", "first_exhausted")).lower()
    if strategy != "first_exhausted" and any(weights):
        conv.note(
            f"{split}.mixture_strategy", f"{strategy}: peftcli's weighted mix stops with the first source used up"
        )
    finish_sources(conv)
    validation = conv.take("data.validation.datasets") or []
    if validation:
        source = _dataset(conv, "data.validation.datasets[0]", validation[0], validation=True)
        if source:
            conv.put("data.validation", source)
        if len(validation) > 1:
            conv.note("data.validation.datasets", "peftcli validates on one data source; only the first was kept")
    if conv.has("data.test.datasets"):
        conv.note("data.test.datasets", "Oumi does not train or validate on the test split")
    for key in [k for k in conv.data if k.startswith(("data.validation.", "data.test.")) and k not in conv.used]:
        conv.no_effect(key, "peftcli prepares validation data as it prepares the training data")
    _length(conv, trainer)
    _mask(conv, split)
    packing = conv.take(f"{split}.pack", False) or conv.take("training.trainer_kwargs.packing", False)
    conv.put("data.packing", bool(packing))
    if conv.has(f"{split}.pack") and conv.data[f"{split}.pack"]:
        conv.note(
            f"{split}.pack",
            "Oumi packs text into fixed-length chunks that attend across examples; peftcli's packing keeps each "
            "example apart",
        )
    elif not packing:
        conv.defaults.append(("data.packing", False, "Oumi packs nothing unless data.train.pack is set"))
    for key in (f"{split}.stream", f"{split}.use_torchdata", f"{split}.seed", f"{split}.target_col"):
        conv.no_effect(key, "peftcli reads and shuffles the whole dataset itself")
    if conv.has("training.data_seed"):
        conv.put("data.shuffle_seed", int(conv.take("training.data_seed")))


def _length(conv: Converter, trainer: str) -> None:
    for key in ("training.trainer_kwargs.max_length", "training.trainer_kwargs.max_seq_length"):
        if conv.has(key) and not conv.has("model.model_max_length"):
            conv.put("data.max_length", int(conv.take(key)))
        conv.used.add(key)
    if conv.has("model.model_max_length"):
        conv.put("data.max_length", int(conv.take("model.model_max_length")))
    elif conv.get("data.max_length") is None:
        if trainer == "TRL_SFT":
            conv.put("data.max_length", TRL_MAX_LENGTH)
            conv.defaults.append(("data.max_length", TRL_MAX_LENGTH, "TRL SFTConfig's max_length, which Oumi keeps"))
        else:
            conv.note(
                "model.model_max_length",
                "unset: Oumi truncates at the tokenizer's own limit; the recipe keeps peftcli's 1024, so set "
                "data.max_length",
            )


def _mask(conv: Converter, split: str) -> None:
    """Which tokens Oumi's loss covers: every token, unless the completions-only collator (or a dataset's
    assistant_only option) masks all but the assistant turns."""
    collator = conv.take(f"{split}.collator_name")
    target = conv.take(f"{split}.train_target")
    entries = conv.data.get(f"{split}.datasets") or []
    assistant_only = any(
        isinstance(entry, dict) and (entry.get("dataset_kwargs") or {}).get("assistant_only") for entry in entries
    )
    only = collator == COMPLETIONS_COLLATOR or assistant_only
    if collator not in (None, "text_with_padding", COMPLETIONS_COLLATOR):
        conv.note(f"{split}.collator_name", f"{collator}: a multimodal collator; peftcli trains text models")
    conv.put("data.mask_prompt", bool(only))
    if not only:
        conv.defaults.append(("data.mask_prompt", False, "Oumi trains on every token without the completions collator"))
    if target is not None and str(target).upper() == "FINAL_ASSISTANT_TURN":
        conv.note(f"{split}.train_target", "final_assistant_turn: peftcli trains on every assistant turn")
    if conv.has(f"{split}.collator_kwargs"):
        conv.note(
            f"{split}.collator_kwargs",
            "templates Oumi matches to find the assistant turns; peftcli finds them from the chat template itself",
        )


def _dataset(conv: Converter, key: str, entry: Any, validation: bool = False) -> dict | None:
    """One Oumi dataset entry as a peftcli source, or None (with a note) when peftcli cannot read its rows."""
    if not isinstance(entry, dict) or not entry.get("dataset_name"):
        raise ConfigImportError(f"{conv.path}: {key}: a dataset entry needs a dataset_name")
    entry = dict(entry)
    name = str(entry.pop("dataset_name"))
    local = entry.pop("dataset_path", None)
    kwargs = dict(entry.pop("dataset_kwargs", None) or {})
    extra: dict[str, Any] = {"split": entry.pop("split", "train"), "subset": entry.pop("subset", None)}
    if extra["split"] == "train":
        extra["split"] = None
    count, shuffle = entry.pop("sample_count", None), entry.pop("shuffle", False)
    weight = entry.pop("mixture_proportion", None)
    if weight is not None and not validation:
        extra["weight"] = float(weight)
    if count is not None:
        # builders/data.py: the first N rows (a shuffled N with shuffle), repeating rows past the total; peftcli's
        # samples (a seeded random N, repeating) is the shuffled case, but a mix entry takes a weight or samples
        random = shuffle and not validation and weight is None
        extra["samples" if random else "max_samples"] = int(count)
        if shuffle and not random:
            conv.note(f"{key}.sample_count", "Oumi shuffles before taking N rows; peftcli takes the first N")
    for rest in ("seed", "shuffle_buffer_size", "transform_num_workers", "trust_remote_code"):
        entry.pop(rest, None)  # shuffling and workers: peftcli's own; remote code: the model section's
    for rest in entry:
        conv.note(f"{key}.{rest}", "a dataset option peftcli has no equivalent for")
    kwargs.pop("assistant_only", None)  # read by _mask
    kwargs.pop("return_tensors", None)  # a tokenizer output type
    shaped = _dataset_format(conv, key, name, local, kwargs)
    for rest in kwargs:
        conv.note(f"{key}.dataset_kwargs.{rest}", "a dataset option peftcli has no equivalent for")
    if shaped is None:
        return None
    path, fmt, columns = shaped
    return make_source(conv, f"{key}.dataset_name", path, fmt, columns, **extra)


def _dataset_format(
    conv: Converter, key: str, name: str, local: str | None, kwargs: dict
) -> tuple[str, str, dict[str, str]] | None:
    """(path, format, columns) of an Oumi dataset class peftcli can read, after its datasets/sft/*.py."""
    if name in TEXT_SFT:
        if not local:
            raise ConfigImportError(f"{conv.path}: {key}: {name} reads a local file; give its dataset_path")
        found = conv.local_path(str(local))
        if not found:
            raise ConfigImportError(f"{conv.path}: {key}.dataset_path: data file {local} not found")
        return found, *_text_sft_format(conv, key, found, kwargs.pop("format", None))
    path = str(local) if local else name
    if name in ALPACA_DATASETS:
        if kwargs.pop("include_system_prompt", True):
            conv.note(
                f"{key}.dataset_name",
                f"{name}: Oumi's Alpaca class adds its 'Below is an instruction...' system prompt and an '### Input:' "
                "heading; peftcli renders instruction and input through the chat template",
            )
        return path, "alpaca", {}
    if name in CHAT_DATASETS:
        return path, "chat", {}
    if name == "HuggingFaceDataset":
        column = str(kwargs.pop("messages_column", "messages"))
        if kwargs.pop("exclude_final_assistant_message", False):
            conv.note(f"{key}.dataset_kwargs.exclude_final_assistant_message", "peftcli trains on every turn")
        source = str(local or kwargs.pop("hf_dataset_path", None) or "")
        if not source:
            raise ConfigImportError(f"{conv.path}: {key}: HuggingFaceDataset needs dataset_kwargs.hf_dataset_path")
        return source, "chat", {} if column == "messages" else {"messages": column}
    if name == "PromptResponseDataset":
        prompt, response = str(kwargs.pop("prompt_column", "instruction")), str(kwargs.pop("response_column", "output"))
        source = str(local) if local else str(kwargs.pop("hf_dataset_path", "O1-OPEN/OpenO1-SFT"))
        return source, "prompt_completion", {"prompt": prompt, "completion": response}
    conv.note(
        f"{key}.dataset_name",
        f"{name}: not an Oumi SFT dataset class peftcli reads (text_sft with a local file, "
        f"{', '.join(ALPACA_DATASETS + CHAT_DATASETS)}, HuggingFaceDataset, PromptResponseDataset); the dataset "
        "was left out",
    )
    return None


def _text_sft_format(conv: Converter, key: str, path: str, fmt: str | None) -> tuple[str, dict[str, str]]:
    """The format of a text_sft file, detected as Oumi's TextSftJsonLinesDataset does from its first row."""
    record = first_record(path) if path.lower().endswith((".json", ".jsonl")) else None
    if record is None:
        raise ConfigImportError(f"{conv.path}: {key}.dataset_path: {path}: text_sft reads .jsonl or .json files")
    messages = record.get("messages")
    if fmt in (None, "oumi") and isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return "chat", {}
    if fmt in (None, "alpaca") and {"instruction", "input", "output"} <= set(record):
        return "alpaca", {}
    if isinstance(record.get("conversation"), dict):
        raise ConfigImportError(
            f"{conv.path}: {key}.dataset_path: {path}: conversations nested as conversation.messages; peftcli reads "
            "a top-level messages column, so move them there"
        )
    raise ConfigImportError(
        f"{conv.path}: {key}.dataset_path: {path}: unknown dataset format (columns "
        f"{', '.join(sorted(record)) or 'none'}); text_sft reads messages or instruction/input/output rows"
    )
