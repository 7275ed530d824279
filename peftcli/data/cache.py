"""The tokenized-data cache: tokenize once (`peft data prepare`, or the first `peft train`), then only read.

An entry is found by a key over everything that decides the token ids and labels:
- the content of the data: a SHA-256 of the bytes of each local file (of every file under a local directory);
  a hub dataset by datasets' own fingerprint of what it loaded. Content, not path + size + mtime: a file
  regenerated with the same size within the clock's resolution, or copied with its times kept (cp -p, rsync -t),
  would keep a stale entry, and hashing costs about a second per GB, far less than tokenizing it. The path is
  not part of the key, so the same data copied to each node's disk finds the same entry.
- the recipe's data section (max_length, formats, columns, prompt style, labels, masking, validation),
  without the keys that only change batching, and the seed of a held-out validation split;
- model.task;
- the tokenizer as it saves itself (vocabulary, merges, special tokens, chat template);
- the code that renders examples (peftcli's version and the source of the data package), and the versions of
  datasets, tokenizers and transformers.

An entry is written under a hidden staging name with its writer recorded, then renamed into place: a killed
prepare leaves no entry, only a staging directory that the next prepare on this host (or `peft clean`) removes.
Its entry.json lists every file with its size and SHA-256; an entry whose files do not match is rebuilt, never
read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path

import peftcli
from peftcli.data.prepare import PreparedData, SplitStats, prepare_data
from peftcli.errors import OutputError
from peftcli.recipe.base import StrictModel
from peftcli.recipe.schema import DataSource, Recipe, SplitValidation
from peftcli.writers import WRITER_FILE, gone, me, read_holder

CACHE_ENV = "PEFTCLI_DATA_CACHE"  # where entries go; default: $PEFTCLI_HOME/tokenized
ENTRY_FILE = "entry.json"  # written last, inside the staging directory: an entry without it is not one
LAYOUT = 1  # bump when the layout of an entry changes
BATCHING_ONLY = {"packing", "group_by_length"}  # data keys that change how batches are formed, not token ids
LIBRARIES = ("datasets", "tokenizers", "transformers")
SPLITS = ("train", "validation")
CHUNK = 1 << 20
# tokenizer_config.json keys that say where and how a tokenizer was loaded, not how it tokenizes
LOADING_KEYS = {"name_or_path", "is_local", "local_files_only", "_commit_hash", "tokenizer_file", "vocab_file"}


def cache_root() -> Path:
    """Where entries live: $PEFTCLI_DATA_CACHE, else $PEFTCLI_HOME/tokenized (~/.cache/peftcli/tokenized)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("PEFTCLI_HOME", "~/.cache/peftcli")).expanduser() / "tokenized"


@dataclass
class CacheEntry:
    """Where a recipe's tokenized data is cached, and what happened to it this time."""

    path: Path
    reused: bool  # read from the cache; nothing was tokenized
    written: bool  # False when tokenized but the cache could not be written (see note)
    size: int = 0  # bytes on disk
    note: str | None = None  # a damaged entry rebuilt, or why nothing was written


def tokenized_data(recipe: Recipe, tokenizer, progress=None, must_write: bool = False):
    """The recipe's prepared data and its cache entry: read from the cache when a sound entry is there, else
    tokenized (telling `progress`) and written. A cache that cannot be written is an OutputError when
    `must_write`, else a note, and the data tokenized now is returned."""
    import datasets

    datasets.disable_progress_bars()
    key, parts = cache_key(recipe, tokenizer)
    path = cache_root() / key
    found, problem = read_entry(path, key)
    if found is not None:
        return found, CacheEntry(path, reused=True, written=True, size=_entry_size(path))
    note = None
    if problem:
        note = f"the cached tokenized data in {path} is damaged ({problem}); tokenized again"
        shutil.rmtree(path, ignore_errors=True)
    with _datasets_cache_off():
        data = prepare_data(recipe, tokenizer, progress)
    try:
        write_entry(path, key, data, parts)
    except OSError as exc:
        reason = f"cannot write the tokenized data cache {path}: {exc.strerror or exc}"
        if must_write:
            raise OutputError(f"{reason}; free space, or set {CACHE_ENV} to a writable directory") from None
        return data, CacheEntry(path, reused=False, written=False, note=f"{reason}; training on the data tokenized now")
    stored, problem = read_entry(path, key)
    if stored is None:  # just written and checked: only a concurrent deletion gets here
        raise OutputError(f"{path}: the tokenized data written a moment ago cannot be read back ({problem})")
    return stored, CacheEntry(path, reused=False, written=True, size=_entry_size(path), note=note)


# --- the key ------------------------------------------------------------------------------------------------------


def cache_key(recipe: Recipe, tokenizer) -> tuple[str, dict]:
    """The entry's name, and the facts it is made from (also stored in the entry, for people)."""
    data = recipe.data
    parts = {
        "layout": LAYOUT,
        "data": {
            name: _described(getattr(data, name), f"data.{name}")
            for name in type(data).model_fields
            if name not in BATCHING_ONLY
        },
        "split_seed": (
            (data.shuffle_seed if data.shuffle_seed is not None else recipe.training.seed)
            if isinstance(data.validation, SplitValidation) or data.mixed  # a list of sources is drawn by it
            else None
        ),
        "task": recipe.model.task,
        "tokenizer": tokenizer_digest(tokenizer),
        "code": code_digest(),
        "libraries": {name: version(name) for name in LIBRARIES},
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], parts


def _described(value, where: str):
    """A recipe value as plain data, each data source with its content's identity in place of its path."""
    if isinstance(value, DataSource):
        return {**value.model_dump(mode="json", exclude={"path"}), "content": source_identity(value, where)}
    if isinstance(value, StrictModel):
        return {name: _described(getattr(value, name), f"{where}.{name}") for name in type(value).model_fields}
    if isinstance(value, (list, tuple)):
        return [_described(item, f"{where}.{i}") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _described(v, f"{where}.{k}") for k, v in value.items()}
    return value


def source_identity(source: DataSource, where: str) -> str:
    """A local file's or directory's content hash; a hub dataset's datasets fingerprint."""
    path = Path(source.path)
    if path.is_file():
        return "sha256:" + _file_hash(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_hash(file)}\0".encode())
        return "sha256-dir:" + digest.hexdigest()
    from peftcli.data.sources import load_source

    return f"datasets:{source.path}:{load_source(source, where)._fingerprint}"


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)  # datasets skips these too


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A hash of the files the tokenizer saves (vocabulary, merges, special tokens, chat template), without the
    settings that only say where it was loaded from."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="peftcli-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            content = file.read_bytes()
            if file.name == "tokenizer_config.json":
                config = {k: v for k, v in json.loads(content).items() if k not in LOADING_KEYS}
                content = json.dumps(config, sort_keys=True).encode()
            digest.update(f"{file.relative_to(tmp).as_posix()}\0".encode() + content + b"\0")
    return digest.hexdigest()


def code_digest() -> str:
    """peftcli's version and a hash of the data package's modules, which turn rows into token ids (a change
    there, released or not, makes new entries; a change that does not alter token ids costs one tokenization)."""
    digest = hashlib.sha256(peftcli.__version__.encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return f"{peftcli.__version__}+{digest.hexdigest()[:16]}"


# --- reading and writing entries ------------------------------------------------------------------------------------


def read_entry(path: Path, key: str) -> tuple[PreparedData | None, str | None]:
    """The prepared data of a sound entry, else None and what is wrong (None as well when there is no entry)."""
    if not path.is_dir():
        return None, None
    try:
        entry = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {ENTRY_FILE}"
    except (OSError, ValueError) as exc:
        return None, f"{ENTRY_FILE} unreadable: {exc}"
    if not isinstance(entry, dict) or entry.get("layout") != LAYOUT or entry.get("key") != key:
        return None, f"{ENTRY_FILE} is not of this key or layout"
    try:
        return _entry_data(path, entry), None
    except _Damaged as exc:
        return None, str(exc)
    except (KeyError, TypeError, AttributeError) as exc:  # an entry.json edited or cut by hand
        return None, f"{ENTRY_FILE} is incomplete ({type(exc).__name__}: {exc})"


class _Damaged(Exception):
    """What is wrong with an entry's files."""


def _entry_data(path: Path, entry: dict) -> PreparedData:
    import datasets

    for name, facts in entry["files"].items():
        file = path / name
        if not file.is_file():
            raise _Damaged(f"{name} is missing")
        if file.stat().st_size != facts["bytes"] or _file_hash(file) != facts["sha256"]:
            raise _Damaged(f"{name} differs from when it was written")
    splits = {}
    for name in SPLITS:
        rows = entry["rows"].get(name)
        if rows is None:
            splits[name] = None
            continue
        try:
            splits[name] = datasets.load_from_disk(str(path / name))
        except Exception as exc:  # datasets raises many types for a broken directory
            raise _Damaged(f"{name} cannot be read: {exc}") from None
        if len(splits[name]) != rows:
            raise _Damaged(f"{name} has {len(splits[name])} rows, not {rows}")
    prepared = dict(entry["prepared"])
    prepared["stats"] = {name: SplitStats(**stats) for name, stats in prepared["stats"].items()}
    return PreparedData(**splits, **prepared)


def write_entry(path: Path, key: str, data: PreparedData, parts: dict) -> None:
    """Write an entry whole or not at all (staged under a hidden name, then renamed); when another process
    published the same entry first, its entry stays and this one is dropped."""
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(root)
    staging = root / f".{key}-{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        (staging / WRITER_FILE).write_text(json.dumps(me()), encoding="utf-8")
        rows = {}
        for name in SPLITS:
            split = getattr(data, name)
            if split is not None:
                split.save_to_disk(str(staging / name))
                rows[name] = len(split)
        files = {
            file.relative_to(staging).as_posix(): {"bytes": file.stat().st_size, "sha256": _file_hash(file)}
            for file in sorted(staging.rglob("*"))
            if file.is_file() and file.name != WRITER_FILE
        }
        prepared = {f.name: getattr(data, f.name) for f in fields(data) if f.name not in SPLITS}
        prepared["stats"] = {name: asdict(stats) for name, stats in data.stats.items()}
        entry = {"layout": LAYOUT, "key": key, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "made_from": parts,
                 "rows": rows, "files": files, "prepared": prepared}  # fmt: skip
        _write_json(staging / ENTRY_FILE, entry)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / ENTRY_FILE).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # published by another process meanwhile
            return
        (path / WRITER_FILE).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, value: dict) -> None:
    """A file flushed to disk before the rename that publishes it."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def remove_dead_staging(root: Path) -> list[Path]:
    """Remove staging directories whose writer died on this host (a killed prepare); returns them."""
    removed = []
    for staging in root.glob(".*.partial"):
        holder = read_holder(staging / WRITER_FILE)
        if holder and gone(holder):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


@contextmanager
def _datasets_cache_off():
    """Tokenize without datasets' own cache: this cache is the one kept (datasets' would be a second copy, keyed
    by a hash of the render function that misses changes in the code it calls); map results go to temporary
    files that datasets removes when the process ends."""
    from datasets.fingerprint import disable_caching, enable_caching, is_caching_enabled

    was = is_caching_enabled()
    disable_caching()
    try:
        yield
    finally:
        if was:
            enable_caching()


def _entry_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
