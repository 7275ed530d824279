"""The data side of the ms-swift importer: its dataset syntax, the row formats its preprocessor reads, and the
data keys (max_length, truncation, packing, loss_scale, system, template), checked against modelscope/ms-swift
at 3602360 (swift/dataset/, swift/arguments/base_args/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftcli.recipe.importers.common import Converter, chat_columns, finish_sources, first_record, make_source
from peftcli.recipe.importers.result import ConfigImportError

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# arguments/base_args/data_args.py: split_dataset_ratio 0.0 (0.01 before ms-swift 3.6)
SPLIT_DATASET_RATIO = 0.0
# arguments/base_args/template_args.py: loss_scale 'default' (every assistant turn), truncation_strategy None
# ('delete': longer examples are dropped), max_length None (the model's max_model_len)
LOSS_SCALE = "default"
# dataset/preprocessor/core.py (AutoPreprocessor, ResponsePreprocessor): the column names ms-swift reads
MESSAGE_COLUMNS = ("messages", "conversation", "conversations")
QUERY_COLUMNS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_COLUMNS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution")
TEXT_COLUMNS = ("text", "completion", "content")
USER_ROLES, ASSISTANT_ROLES = ("user", "human"), ("assistant", "gpt", "bot")


def name_list(value: Any) -> list[str]:
    """A key that takes one name or a list of them, as a list."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(item) for item in value]


def map_data(conv: Converter) -> None:
    """The dataset, validation and data-shaping keys."""
    system = _system(conv)
    hub = bool(conv.data.get("use_hf"))
    rename = _columns(conv)
    for index, spec in enumerate(name_list(conv.take("dataset"))):
        source = _source(conv, f"dataset[{index}]", spec, rename, hub)
        if source:
            conv.sources.append(_with_system(source, system))
    finish_sources(conv)
    validation = name_list(conv.take("val_dataset"))
    if validation:
        source = _source(conv, "val_dataset[0]", validation[0], rename, hub)
        if source:
            if "samples" in source:  # a validation source takes the first N rows, not a random N
                source["max_samples"] = source.pop("samples")
                conv.note("val_dataset[0]", "#N: ms-swift samples N rows at random; peftcli takes the first N")
            conv.put("data.validation", _with_system(source, system))
        if len(validation) > 1:
            conv.note("val_dataset", "peftcli validates on one data source; only the first was kept")
        conv.used.add("split_dataset_ratio")
    else:
        ratio = conv.take("split_dataset_ratio", SPLIT_DATASET_RATIO)
        if ratio and 0 < float(ratio) < 1:
            conv.put("data.validation", {"fraction": float(ratio)})
    if conv.has("data_seed"):
        conv.put("data.shuffle_seed", int(conv.take("data_seed")))
    if conv.has("max_length"):
        conv.put("data.max_length", int(conv.take("max_length")))
    else:
        conv.note(
            "max_length",
            "unset: ms-swift uses the model's maximum length (config.json); the recipe keeps peftcli's 1024, so "
            "set data.max_length",
        )
    truncation = conv.take("truncation_strategy") or "delete"
    if truncation != "right":
        conv.note(
            "truncation_strategy",
            f"{'unset (delete)' if not conv.has('truncation_strategy') else truncation}: ms-swift "
            f"{'drops examples longer than max_length' if truncation == 'delete' else 'handles long examples so'}; "
            "peftcli cuts them at data.max_length from the right",
        )
    conv.copy("packing", "data.packing", False, "ms-swift's packing default", convert=bool)
    _loss_scale(conv)
    template = conv.take("template")
    if template:
        conv.note(
            "template",
            f"{template}: peftcli renders chats with the tokenizer's own chat template (as ms-swift's "
            "template_backend jinja does), not ms-swift's named templates",
        )
    for key in ("model_name", "model_author"):
        if conv.has(key):
            conv.note(
                key,
                "fills the {{NAME}}/{{AUTHOR}} placeholders of ms-swift's self-cognition data; peftcli reads rows "
                "as they are",
            )


def _system(conv: Converter) -> str | None:
    """The `system` prompt: text, or a .txt file ms-swift reads."""
    value = conv.take("system")
    if value is None:
        return None
    text = str(value)
    if text.endswith(".txt"):
        found = conv.local_path(text)
        if not found:
            raise ConfigImportError(f"{conv.path}: system: file {text} not found")
        return Path(found).read_text(encoding="utf-8")
    return text.replace("\\n", "\n")


def _with_system(source: dict, system: str | None) -> dict:
    if system is not None and source.get("format") != "text":
        source["system_prompt"] = system
    return source


def _columns(conv: Converter) -> dict[str, str]:
    """ms-swift's `columns` option: the data's column names -> ms-swift's standard ones."""
    value = conv.take("columns")
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigImportError(f"{conv.path}: columns: not a JSON mapping: {value}") from None
    if not isinstance(value, dict):
        raise ConfigImportError(f"{conv.path}: columns: expected a mapping of column names, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _parse_spec(conv: Converter, spec: str) -> tuple[str, list[str], int | None, bool]:
    """`[hf::|ms::]name_or_path[:subset1/subset2][#count]` (dataset/dataset_syntax.py) -> name, subsets, count,
    and whether it is local."""
    if conv.local_path(spec):
        return spec, [], None, True
    name = spec.split("::", 1)[1] if spec.startswith(("hf::", "ms::")) else spec
    count = None
    if "#" in name and not conv.local_path(name):
        name, _, tail = name.rpartition("#")
        try:
            count = int(tail)
        except ValueError:
            raise ConfigImportError(f"{conv.path}: dataset {spec}: #{tail} is not a sample count") from None
    if conv.local_path(name):
        return name, [], count, True
    name, _, subsets = name.partition(":")
    return name, [s.strip() for s in subsets.split("/") if s.strip()], count, False


def _source(conv: Converter, key: str, spec: str, rename: dict[str, str], use_hf: bool) -> dict | None:
    """One `dataset` entry as a peftcli source, or None (with a note) when its rows cannot be read as they are."""
    name, subsets, count, local = _parse_spec(conv, spec)
    extra: dict[str, Any] = {}
    if subsets and subsets != ["default"]:
        extra["subset"] = subsets[0]
        if len(subsets) > 1:
            conv.note(key, f"{spec}: subsets {', '.join(subsets[1:])} left out; give each its own dataset entry")
    if count is not None:
        extra["samples"] = count  # dataset_syntax.py: a seeded random subset, repeating rows past the total
    if not local:
        modelscope = spec.startswith("ms::") or not (use_hf or spec.startswith("hf::"))
        conv.note(
            f"{key} (format)",
            f"{name}: the format could not be read from the data; written as chat, change it if the dataset is "
            "not conversations",
        )
        hub = " on ModelScope (ms-swift's hub unless use_hf is set)" if modelscope else ""
        return make_source(conv, key, name, "chat", hub_note=hub, **extra)
    found = conv.local_path(name) or name
    record = first_record(found)
    if record is None:
        raise ConfigImportError(
            f"{conv.path}: {key}: {name}: cannot read its first record (ms-swift datasets here are JSON, JSONL or "
            "CSV files)"
        )
    record = {rename.get(column, column): value for column, value in record.items()}
    shaped = _format(conv, key, name, record)
    if shaped is None:
        return None
    fmt, columns = shaped
    return make_source(conv, key, found, fmt, columns, **extra)


def _format(conv: Converter, key: str, name: str, record: dict) -> tuple[str, dict[str, str]] | None:
    """The peftcli format of a row as ms-swift's AutoPreprocessor reads it (dataset/preprocessor/core.py)."""
    for column in MESSAGE_COLUMNS:
        turns = record.get(column)
        if column in record:
            if not (isinstance(turns, list) and turns and isinstance(turns[0], dict)):
                break
            first = turns[0]
            names = {
                "role": "role" if "role" in first else "from",
                "content": "content" if "content" in first else "value",
            }
            roles = {str(turn.get(names["role"])) for turn in turns if isinstance(turn, dict)}
            names["user"] = next((r for r in USER_ROLES if r in roles), "user")
            names["assistant"] = next((r for r in ASSISTANT_ROLES if r in roles), "assistant")
            columns = chat_columns(conv, key, column, names)
            if columns is None:
                return None
            if "system" in record:
                conv.note(key, f"{name}: its system column is not read; a chat row carries its own system turn")
            return "chat", columns
    if "instruction" in record and ("output" in record or "response" in record):
        if "input" in record:
            conv.note(
                f"{key} (format)",
                f"{name}: alpaca rows; where a row has an input, ms-swift puts it on the line after the "
                "instruction, peftcli after a blank line",
            )
        out = "output" if "output" in record else "response"
        return "alpaca", {} if out == "output" else {"output": out}
    query = next((c for c in QUERY_COLUMNS if c in record), None)
    response = next((c for c in RESPONSE_COLUMNS + TEXT_COLUMNS if c in record and c != query), None)
    if query and response:
        lost = [c for c in ("system", "history") if c in record]
        if lost:
            conv.note(key, f"{name}: its {' and '.join(lost)} column is not read by peftcli's prompt_completion")
        columns = {k: v for k, v in (("prompt", query), ("completion", response)) if k != v}
        return "prompt_completion", columns
    if response in TEXT_COLUMNS:
        conv.note(
            f"{key} (format)",
            f"{name}: rows with only {response}; ms-swift renders each as an assistant reply through its template, "
            "peftcli trains on it as plain text",
        )
        return "text", {} if response == "text" else {"text": response}
    raise ConfigImportError(
        f"{conv.path}: {key}: {name}: no dataset format fits its columns ({', '.join(sorted(record)) or 'none'}); "
        "ms-swift and peftcli read messages, instruction/input/output or query/response rows (set `columns` to "
        "rename yours)"
    )


def _loss_scale(conv: Converter) -> None:
    """Which tokens the loss covers (template_args.py loss_scale): every assistant turn by default."""
    value = str(conv.take("loss_scale", LOSS_SCALE))
    base, *rest = value.split("+")
    if base not in ("default", "last_round", "all"):
        base, rest = "default", [base, *rest]
    conv.put("data.mask_prompt", base != "all")
    if not conv.has("loss_scale"):
        conv.defaults.append(("data.mask_prompt", True, "ms-swift's loss_scale default: every assistant turn"))
    if base == "last_round":
        conv.note("loss_scale", "last_round: peftcli trains on every assistant turn, not only the last")
    if rest:
        conv.note("loss_scale", f"{'+'.join(rest)}: ms-swift's extra loss weighting; peftcli weighs tokens equally")
