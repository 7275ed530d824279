"""Shared pieces of the importers: reading a source file, tracking which keys were used, and the mappings
(optimizers, schedules, DeepSpeed/FSDP, data files) that more than one tool needs."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from peftcli.recipe.importers.result import ConfigImportError, ImportResult, Unmapped

# HF `optim` / Axolotl `optimizer` names -> training.optimizer (the AdamW variants peftcli has).
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw": "adamw",
    "adamw_apex_fused": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw",
    "paged_adamw": "paged_adamw",
}
# HF `lr_scheduler_type` names -> training.schedule (HF's `constant` ignores warm-up: see constant_means_no_warmup).
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def read_source(path: Path) -> dict:
    """The mapping in a YAML or JSON config file, or a one-line error naming the file."""
    if not path.is_file():
        raise ConfigImportError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigImportError(f"{path}: not UTF-8 text; give a YAML or JSON config file") from None
    try:
        data = yaml.safe_load(text)  # YAML 1.1 also reads JSON
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigImportError(f"{where}: invalid YAML/JSON: {problem}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigImportError(f"{path}: a training config is a mapping of keys, but the file is {kind}")
    return data


class Converter:
    """One conversion in progress: the source keys, which of them were used, and the recipe being built."""

    def __init__(self, tool: str, path: Path, data: dict):
        self.tool, self.path, self.data = tool, path, data
        self.config_dir = path.resolve().parent
        self.used: set[str] = set()
        self.unmapped: list[Unmapped] = []
        self.defaults: list[tuple[str, Any, str]] = []
        self.recipe: dict[str, Any] = {"model": {}, "method": {}, "data": {}, "training": {}, "output": {}}
        self.sources: list[dict] = []  # training sources, put in data.train by finish_sources
        # DeepSpeed configs a tool names instead of a file: name -> (config, its description)
        self.deepspeed_builtin: dict[str, tuple[dict, str]] = {}

    # --- reading source keys ---
    def has(self, key: str) -> bool:
        """True when the source sets `key` to a value (an empty YAML key counts as unset)."""
        return self.data.get(key) not in (None, "")

    def take(self, key: str, default: Any = None) -> Any:
        """The value of `key` (or `default` when unset), marking the key as used."""
        self.used.add(key)
        return self.data[key] if self.has(key) else default

    # --- writing recipe keys ---
    def put(self, dotted: str, value: Any) -> None:
        """Set a recipe key given as a dotted path (training.batch_size)."""
        node = self.recipe
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        """A recipe key already set, or `default`."""
        node: Any = self.recipe
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def copy(self, key: str, dotted: str, default: Any, why: str, convert=lambda v: v) -> Any:
        """Map source `key` to recipe `dotted`; when unset, write the source tool's default (and say so)."""
        if self.has(key):
            value = convert(self.take(key))
        else:
            self.used.add(key)
            value = default
            self.defaults.append((dotted, default, why))
        self.put(dotted, value)
        return value

    # --- accounting ---
    def note(self, key: str, reason: str) -> None:
        """List `key` as not (or only approximately) carried over; marks it used."""
        self.used.add(key)
        self.unmapped.append(Unmapped(key, reason))

    def no_effect(self, key: str, reason: str) -> None:
        """A key peftcli has no use for: listed when the source sets it, with why it does not matter."""
        if self.has(key) and key not in {item.key for item in self.unmapped}:  # an empty key: listed by finish()
            self.used.add(key)
            self.unmapped.append(Unmapped(key, f"no effect in peftcli: {reason}"))

    def list_unused(self, no_effect: dict[str, str], not_supported: dict[str, str]) -> None:
        """List the tool's keys peftcli has no use for and those it cannot do, where the source sets them."""
        for key, reason in no_effect.items():
            self.no_effect(key, reason)
        for key, reason in not_supported.items():
            if self.has(key):
                self.note(key, reason)

    def finish(self) -> ImportResult:
        """The result, listing every source key nothing above used."""
        noted = {item.key for item in self.unmapped}
        for key, value in self.data.items():
            if key in noted:
                continue
            if value in (None, ""):  # listed whether or not a mapping looked at it: it carries nothing
                self.note(key, f"empty, so {self.tool}'s default applies (written out where peftcli's differs)")
            elif key not in self.used:
                self.note(key, f"not a key the {self.tool} importer knows; no peftcli setting was made from it")
        return ImportResult(self.tool, str(self.path), self.recipe, self.unmapped, self.defaults)

    # --- shared mappings ---
    def local_path(self, value: str) -> str | None:
        """An existing local file or directory named by `value`, absolute; relative paths are tried against the
        current directory (where the source tool would read them) and then the config file's directory."""
        path = Path(os.path.expanduser(value))
        bases = [Path()] if path.is_absolute() else [Path.cwd(), self.config_dir]
        for base in bases:
            candidate = base / path
            if candidate.exists():
                return str(candidate.resolve())
        return None

    def map_optimizer(self, key: str) -> None:
        """Source optimizer name -> training.optimizer, or a note when peftcli has no such optimizer."""
        if not self.has(key):
            self.used.add(key)
            return
        name = str(self.take(key))
        if name in OPTIMIZERS:
            self.put("training.optimizer", OPTIMIZERS[name])
        else:
            self.note(
                key,
                f"{name}: peftcli trains with AdamW variants only "
                f"({', '.join(sorted(set(OPTIMIZERS.values())))}); the recipe uses adamw",
            )

    def map_schedule(self, key: str, default: str, why: str) -> None:
        """Source scheduler name -> training.schedule; the source default is written when unset."""
        name = str(self.take(key, default))
        if name in SCHEDULES:
            if not self.has(key):
                self.defaults.append(("training.schedule", SCHEDULES[name], why))
            self.put("training.schedule", SCHEDULES[name])
        else:
            self.note(key, f"{name}: peftcli has constant, linear and cosine schedules; the recipe uses cosine")
            self.put("training.schedule", "cosine")

    def map_deepspeed(self, key: str, config: dict | None = None, where: str | None = None) -> None:
        """A DeepSpeed config (path or inline mapping, or `config` read from `where` by the caller: a tool's
        built-in file or its own section) -> the nearest launch preset, saying what was approximated."""
        value = self.take(key)
        if value is None or value is False:
            return
        if config is None and isinstance(value, str) and value in self.deepspeed_builtin:
            config, builtin = self.deepspeed_builtin[value]
            where = f"{self.tool}'s built-in {builtin}"
        if config is not None:
            pass
        elif isinstance(value, dict):
            config, where = value, "inline config"
        else:
            found = self.local_path(str(value))
            if found and found.endswith(".json"):
                try:
                    config, where = json.loads(Path(found).read_text(encoding="utf-8")), found
                except (OSError, ValueError):
                    config = None
        if isinstance(config, dict):
            zero = config.get("zero_optimization") or {}
            stage = zero.get("stage", 0)
            offload = [
                part
                for part in ("offload_optimizer", "offload_param")
                if str((zero.get(part) or {}).get("device", "none")).lower() not in ("none", "")
            ]
            how = f"read {where}: ZeRO stage {stage}" + (f" with {' and '.join(offload)}" if offload else "")
        else:
            name = Path(str(value)).name.lower()
            match = re.search(r"zero_?(\d)", name)
            if not match:
                self.note(key, f"{value}: file not found and its name gives no ZeRO stage; set launch.preset yourself")
                return
            stage, offload = int(match.group(1)), ["offload"] if "offload" in name else []
            how = f"file not found, so the ZeRO stage ({stage}) was taken from its name"
        preset = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3_offload" if offload else "zero3"}.get(stage)
        if preset is None:
            self.note(key, f"{value}: ZeRO stage {stage} is not one of 0-3; set launch.preset yourself")
            return
        self.put("launch", {"preset": preset})
        lost = (
            " (its offload is not part of zero2; make an accelerate config with offload and name it)"
            if (offload and stage == 2)
            else ""
        )
        self.note(
            key,
            f"approximated by launch.preset {preset} ({how}){lost}; the preset's own DeepSpeed settings replace the "
            "file's other settings (buckets, 'auto' values, precision)",
        )

    def map_fsdp(self, keys: list[str]) -> None:
        """Any FSDP setting -> launch preset fsdp2 (peftcli's FSDP is FSDP2 with its own wrapping policy)."""
        present = [k for k in keys if self.has(k) and self.data[k] not in (False, [], {})]
        for key in keys:
            self.used.add(key)
        if not present:
            for key in keys:
                if key in self.data:
                    self.no_effect(key, "FSDP is off in the source")
            return
        self.put("launch", {"preset": "fsdp2"})
        for key in present:
            self.note(
                key,
                "approximated by launch.preset fsdp2 (FSDP2, one wrap per decoder layer); the source's "
                "sharding, wrapping, offload and state-dict options are not carried",
            )


def first_record(path: str) -> dict | None:
    """The first record of a local JSON/JSONL file (or the header of a CSV file, as a row of empty values), or
    None when the file cannot be read that way."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv") or not file.is_file():
        return None
    try:
        with file.open(encoding="utf-8") as handle:
            if suffix == ".csv":
                header = next(csv.reader(handle))
                return dict.fromkeys(header, "")
            if suffix == ".jsonl":
                return _mapping(json.loads(next(line for line in handle if line.strip())))
            rows = json.load(handle)
    except (OSError, ValueError, StopIteration, csv.Error):
        return None
    return _mapping(rows[0] if isinstance(rows, list) and rows else None)


def _mapping(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def sniff_format(path: str) -> tuple[str, dict[str, str]] | None:
    """The data format and column mapping of a local JSON/JSONL file, judged from its first record."""
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        return None
    first = first_record(path)
    if first is None:
        return None
    for column in ("messages", "conversations", "conversation"):
        turns = first.get(column)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and {"role", "content"} <= set(turns[0]):
            return "chat", ({} if column == "messages" else {"messages": column})
    if {"prompt", "completion"} <= set(first):
        return "prompt_completion", {}
    if {"instruction", "output"} <= set(first):
        return "alpaca", {}
    if "text" in first:
        return "text", {}
    return None


def looks_like_file(value: str) -> bool:
    """True when a dataset name is written as a file path rather than a hub id."""
    return value.startswith(("/", "./", "../", "~")) or value.lower().endswith(DATA_SUFFIXES)


def make_source(
    conv: Converter,
    key: str,
    path: str,
    fmt: str,
    columns: dict[str, str] | None = None,
    hub_note: str = "",
    **extra,
) -> dict:
    """One data source: a local file (written absolute) or a hub name kept as given and listed, since reading it
    needs the network (`hub_note` adds to that line, e.g. which hub the name belongs to)."""
    source: dict[str, Any] = {"path": path, "format": fmt}
    found = conv.local_path(path)
    if found:
        source["path"] = found
    elif looks_like_file(path):
        raise ConfigImportError(
            f"{conv.path}: {key}: data file {path} not found (looked in the current directory and beside the config)"
        )
    else:
        conv.note(
            key,
            f"{path} is a hub dataset{hub_note}: kept as data path, but peftcli reads hub datasets only with network "
            "access and the data cache; download it and set the data path to the local file",
        )
    if columns:
        source["columns"] = columns
    source.update({k: v for k, v in extra.items() if v is not None})
    return source


def finish_sources(conv: Converter) -> None:
    """Put the collected sources in data.train: one mapping, or a list (also for one source with a sample count
    or weight, which only list entries have)."""
    sources = conv.sources
    if not sources:
        why = "; ".join(u.line() for u in conv.unmapped if u.key.startswith(("dataset", "data", "train")))
        raise ConfigImportError(
            f"{conv.path}: no training data peftcli can read{f' ({why})' if why else ''}; name a local dataset "
            "in the config, or write data.train in a recipe by hand"
        )
    single = len(sources) == 1 and not {"samples", "weight"} & set(sources[0])
    conv.recipe["data"] = {"train": sources[0] if single else sources, **conv.recipe["data"]}


def chat_columns(conv: Converter, key: str, column: str, names: dict[str, str]) -> dict[str, str] | None:
    """Columns of a chat source whose messages live in `column`, or None (with a note) when its messages do not
    use peftcli's role/content keys and user/assistant roles; `names` maps role, content, user, assistant to the
    source's own names."""
    wanted = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}
    differing = {k: v for k, v in names.items() if v != wanted[k]}
    if differing:
        found = ", ".join(f"{k}={v}" for k, v in differing.items())
        conv.note(
            key,
            f"its messages use {found}; peftcli's chat format reads messages with role/content keys and "
            "user/assistant roles (OpenAI style) and has no mapping for other names; convert the file, then "
            "import again",
        )
        return None
    return {} if column == "messages" else {"messages": column}


def validation_from_size(conv: Converter, key: str) -> None:
    """A held-out share (0 < size < 1) -> data.validation.fraction; a row count cannot be written as one."""
    size = conv.take(key, 0)
    if not size:
        return
    if isinstance(size, (int, float)) and 0 < size < 1:
        conv.put("data.validation", {"fraction": float(size)})
    else:
        conv.note(
            key,
            f"{size}: peftcli holds out a fraction (0-1) of the training rows, not a count; set "
            "data.validation.fraction",
        )


def map_steps(conv: Converter, key: str, dotted: str) -> None:
    """An interval in steps (eval/save/logging) -> its recipe key; a fraction of the run is listed instead."""
    value = conv.take(key)
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        conv.put(dotted, value)
    elif isinstance(value, float) and value.is_integer() and value >= 1:
        conv.put(dotted, int(value))
    else:
        conv.note(key, f"{value}: a fraction of the run; peftcli counts {dotted} in optimizer steps, set it by hand")


def constant_means_no_warmup(conv: Converter, schedule_key: str, prefix: str = "") -> None:
    """HF's `constant` schedule ignores the warm-up settings, where peftcli's would warm up: drop them. `prefix`
    heads the source's warm-up keys (`training.` for a nested config)."""
    keys = ("warmup_steps", "warmup_ratio")
    dropped = [key for key in keys if conv.get(f"training.{key}")]
    if conv.data.get(schedule_key) != "constant" or not dropped:
        return
    for key in dropped:
        del conv.recipe["training"][key]
    conv.defaults = [d for d in conv.defaults if d[0] not in {f"training.{key}" for key in keys}]
    source_keys = [prefix + key for key in keys]
    conv.unmapped = [u for u in conv.unmapped if u.key not in source_keys]
    for key in [key for key in source_keys if conv.has(key)] or [source_keys[0]]:
        conv.note(key, "left out: HF's constant schedule ignores warm-up, so the source run has none")
