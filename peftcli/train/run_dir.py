"""The run directory, its one owner: what files a run holds, how they are read and written, and the rules
for output directories (new or empty, resumed, or deliberately overwritten, never clobbered; merged and
exported outputs appear whole or not at all).

    runs/my-run/
      adapter_config.json, adapter_model.safetensors   (tuners/adapter.py writes them)
      tokenizer files                                 TOKENIZER_FILES
      recipe.yaml                                     the resolved recipe
      summary.json, metrics.jsonl, samples.jsonl      results
      checkpoints/step-0000100/trainer_state.json     resumable state
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from peftcli.errors import OutputError, PeftCliError

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
# What a tokenizer may have written; copied along wherever a run's model or adapter goes.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "spiece.model",
)
LOCK_FILE = ".peftcli.lock"  # held by the one `peft train` writing the directory
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --- reading a run --------------------------------------------------------------------------------------------


def read_recipe(run_dir: Path) -> dict:
    """The run's saved recipe as plain data ({} when there is none: an adapter from elsewhere)."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def read_summary(run_dir: Path) -> dict:
    """The run's summary.json ({} before the run finished, or for an adapter from elsewhere)."""
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_section(run_dir: Path, base: str | None = None):
    """The model section of the run's saved recipe (a `ModelSection`), with `base` replacing its name_or_path;
    an adapter without a recipe falls back to the base its adapter_config.json records.

    Only the model section is validated: the run's data need not exist where a merge or export runs. The
    quantization is dropped: merge and export always read the 16-bit checkpoint.
    """
    from pydantic import ValidationError

    from peftcli.recipe.schema import ModelSection
    from peftcli.tuners.adapter import read_adapter_config

    section = dict(read_recipe(run_dir).get("model") or {})
    if base is not None:
        section["name_or_path"] = base
    if not section.get("name_or_path"):
        _, _, raw = read_adapter_config(run_dir)
        section["name_or_path"] = raw.get("base_model_name_or_path")
    if not section.get("name_or_path"):
        raise PeftCliError(f"{run_dir}: no {RECIPE_FILE} and no base model recorded; pass --base PATH")
    section.pop("quantization", None)
    try:
        return ModelSection(**section)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        source = "--base" if base is not None and where == "name_or_path" else f"{run_dir / RECIPE_FILE}: model.{where}"
        raise PeftCliError(f"{source}: {first['msg'].removeprefix('Value error, ')}") from None


def label_names(run_dir: Path) -> list[str] | None:
    """The class names a classification run trained on, in label-id order."""
    names = read_summary(run_dir).get("label_names")
    return [str(n) for n in names] if names else None


def trained_quantized(run_dir: Path) -> bool:
    """Whether the run trained on a quantized base."""
    return bool((read_recipe(run_dir).get("model") or {}).get("quantization"))


def append_jsonl(path: Path, record: dict) -> None:
    """Add one record to a jsonl file (metrics, samples)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a jsonl file; [] when it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a jsonl file's records."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a hidden temporary beside it, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_summary(run_dir: Path, summary: dict) -> None:
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def write_trainer_state(checkpoint_dir: Path, state: dict) -> None:
    """The loop's own counters; written last and atomically, so its presence marks a complete checkpoint."""
    write_text_atomic(checkpoint_dir / TRAINER_STATE, json.dumps(state, indent=2) + "\n")


def mark_incomplete(checkpoint_dir: Path) -> None:
    """Before a checkpoint directory is (re)written: it is not complete until its new state is."""
    (checkpoint_dir / TRAINER_STATE).unlink(missing_ok=True)


def read_trainer_state(checkpoint_dir: Path) -> dict:
    """Counters of a checkpoint."""
    return json.loads((checkpoint_dir / TRAINER_STATE).read_text(encoding="utf-8"))


# --- outputs that appear whole or not at all --------------------------------------------------------------------


def open_staging_dir(output: Path, overwrite: bool) -> Path:
    """An empty hidden sibling of `output` to write into; refuses an existing output without `overwrite`."""
    if output.exists() and not overwrite:
        raise PeftCliError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, output: Path) -> None:
    """Put a finished staging directory in place; an existing output (with --overwrite) is replaced only now."""
    if output.exists():
        old = output.parent / f".{output.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)


@contextmanager
def staged_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Write a directory under a hidden name and publish it at the end; on any failure nothing is left."""
    tmp = open_staging_dir(output, overwrite)
    try:
        yield tmp
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(output: Path, overwrite: bool) -> Iterator[Path]:
    """Write a file under a hidden unique name beside `output` and rename it at the end (atomic, with the
    usual permissions); on any failure nothing is left, and an output that appeared meanwhile is kept."""
    if output.exists() and not overwrite:
        raise PeftCliError(f"{output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if output.exists() and not overwrite:  # someone wrote it while we were busy
            raise PeftCliError(f"{output} already exists; pass --overwrite to replace it")
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the training output directory ------------------------------------------------------------------------------


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives."""
    return out_dir / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its trainer_state.json exists)."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_run_dir(path: Path) -> bool:
    """True for a directory peftcli wrote (it holds the resolved recipe)."""
    return (path / RECIPE_FILE).is_file()


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with the output directory without touching it: 'new', 'resume', 'overwrite', or
    'restart' (--resume of a run that stopped before its first complete checkpoint: it starts again)."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output.dir: {out_dir} exists and is not a directory")
    empty = not out_dir.exists() or not any(p.name != LOCK_FILE for p in out_dir.iterdir())
    if resume:
        if list_checkpoints(out_dir):
            return "resume"
        if empty:
            return "new"  # nothing to resume yet: a preemptible job's first start
        if is_run_dir(out_dir):
            return "restart"  # stopped before its first complete checkpoint: start it again from the beginning
        raise OutputError(
            f"output.dir: {out_dir} has no checkpoint to resume and is not a peftcli run directory; refusing to "
            "touch it, choose another output.dir"
        )
    if empty:
        return "new"
    if not overwrite:
        raise OutputError(
            f"output.dir: {out_dir} is not empty; pass --overwrite to replace it or --resume to continue it"
        )
    if not is_run_dir(out_dir):
        raise OutputError(
            f"output.dir: {out_dir} is not empty and is not a peftcli run directory; refusing to delete it, "
            "choose another output.dir"
        )
    return "overwrite"


def clear_run_dir(out_dir: Path) -> None:
    """Remove an earlier run's files (only called after check_output_dir said 'overwrite' or 'restart')."""
    for child in out_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for _, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- one writer at a time ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def run_lock(out_dir: Path) -> Iterator[str | None]:
    """Hold the run directory for one `peft train` while it lasts; yields a note when a stale lock was taken over.

    The lock is a file created exclusively, holding the holder's pid, host and start time. A lock whose process
    is gone (same host) is stale and taken over; one from another host cannot be checked and is refused with
    what to do. A directory created only to hold the lock is removed again if the run leaves it empty.
    """
    import socket
    import time

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output.dir: {out_dir} exists and is not a directory")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"output.dir: {out_dir} cannot be created ({exc.strerror}); choose a writable place"
        ) from None
    lock = out_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    note = None
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                note = f"took over the lock of a run that is gone (pid {holder['pid']}, since {holder.get('started')})"
                continue
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                if holder
                else "an unreadable lock"
            )
            raise OutputError(
                f"output.dir: {out_dir} is in use by another peft train ({who}); wait for it, or choose another "
                f"output.dir (if that run is gone, delete {lock})"
            ) from None
        except OSError as exc:
            raise OutputError(f"output.dir: {out_dir} is not writable ({exc.strerror}); choose another place") from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    try:
        yield note
    finally:
        lock.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _read_lock(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as held
    return holder if isinstance(holder, dict) else {}
