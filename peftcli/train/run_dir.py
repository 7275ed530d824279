"""The run directory, its one owner: what files a run holds, how they are read and written, and the rules
for output directories (new or empty, resumed, or deliberately overwritten, never clobbered; merged and
exported outputs appear whole or not at all).

    runs/my-run/
      adapter_config.json, adapter_model.safetensors   (tuners/adapter.py writes them)
      tokenizer files                                 TOKENIZER_FILES
      recipe.yaml                                     the resolved recipe
      summary.json, metrics.jsonl, samples.jsonl      results
      curves.png                                      the metrics drawn (train/curves.py), at the end of a run
      checkpoints/step-0000100/trainer_state.json     resumable state
      trackers.json                                   tracker run ids, so a resume continues them
      tensorboard/, mlruns/, wandb/                   tracker logs (training.report_to)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

from peftcli.errors import DiskFullError, OutputError, PeftCliError
from peftcli.train.safe_write import (
    WRITER_FILE,
    dead_temp_files,
    describe,
    gone,
    me,
    no_space_message,
    read_holder,
    write_text_atomic,
)

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"  # MLflow's local store, when no tracking URI is given
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
        moved = "; if the base model moved, pass --base PATH" if base is None and where == "name_or_path" else ""
        raise PeftCliError(f"{source}: {first['msg'].removeprefix('Value error, ')}{moved}") from None


def unfinished_run(run_dir: Path) -> str | None:
    """What to say of a run directory that has no final adapter yet (None if it is not one, or has one)."""
    from peftcli.tuners.adapter import CONFIG_NAME

    if not is_run_dir(run_dir) or (run_dir / CONFIG_NAME).is_file():
        return None
    checkpoints = list_checkpoints(run_dir)
    newest = f"its newest checkpoint is {checkpoints[-1][1].name}" if checkpoints else "it has no checkpoint yet"
    return (
        f"{run_dir}: this run has not finished ({newest}); continue it with the same peft train command and "
        "--resume, then merge or export the finished run"
    )


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
    """Every record of a jsonl file; [] when it does not exist. A last line cut short (a run killed mid-write)
    is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    with suppress(json.JSONDecodeError):
        records += [json.loads(line) for line in lines[-1:]]
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a jsonl file's records (atomically: the old ones stay if the write fails)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


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


@contextmanager
def run_lock(out_dir: Path) -> Iterator[str | None]:
    """Hold the run directory for one `peft train` while it lasts; yields a note when a stale lock was taken over.

    The lock is a file holding the holder's pid, host and start time, locked with flock: the kernel releases it
    when its process dies however it dies, so a lock file nobody holds is stale. One written on another host
    is still refused, since not every shared filesystem carries flock between hosts. A directory created only
    to hold the lock is removed again if the run leaves it empty.
    """
    import fcntl

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
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise OutputError(f"output.dir: {out_dir} is not writable ({exc.strerror}); choose another place") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            holder = read_holder(lock)
            who = describe(holder) if holder else "a lock being written"
            raise OutputError(
                f"output.dir: {out_dir} is in use by another peft train ({who}); wait for it, or choose another "
                "output.dir"
            ) from None
        try:  # the holder before us may have removed the file while we waited: then lock the new one
            same = os.stat(lock).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    note = None
    holder = read_holder(lock)
    if holder and holder.get("host") != me()["host"]:
        os.close(descriptor)
        raise OutputError(
            f"output.dir: {out_dir} is in use by a peft train on another machine ({describe(holder)}); wait for it, "
            f"or choose another output.dir (if that run is gone, delete {lock})"
        )
    if holder or os.fstat(descriptor).st_size:
        note = f"took over the lock of a run that is gone ({describe(holder) if holder else 'an unreadable lock'})"
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(me()).encode())
    except OSError as exc:
        lock.unlink(missing_ok=True)
        os.close(descriptor)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"output.dir: {no_space_message(lock)}; free space and run again") from None
        raise
    try:
        yield note
    finally:
        lock.unlink(missing_ok=True)  # before the flock goes: a waiting process then sees a new file
        os.close(descriptor)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


# --- leftovers of killed commands ------------------------------------------------------------------------


def leftovers_under(root: Path) -> list[tuple[Path, str]]:
    """What killed peftcli commands left in `root` and the directories directly inside it, with why each is one:
    staging directories and temporary files of dead writers, moved-aside outputs, stale run locks, and
    checkpoints that were never completed (in runs no live process holds)."""
    found: list[tuple[Path, str]] = []
    for directory in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".partial") and path.is_dir():
                holder = read_holder(path / WRITER_FILE)
                if not holder or gone(holder):
                    found.append((path, "an interrupted merge, export or data prepare"))
            elif path.name.startswith(".") and path.name.endswith(".replaced") and path.is_dir():
                found.append((path, "an interrupted --overwrite (restored if the output is missing)"))
        found += [(path, "an interrupted write") for path in dead_temp_files(directory)]
        lock = read_holder(directory / LOCK_FILE)
        if lock and not gone(lock):
            continue  # a live run: its files are its own
        if lock:
            found.append((directory / LOCK_FILE, "the lock of a run that is gone"))
        checkpoints = directory / CHECKPOINTS
        if checkpoints.is_dir():
            found += [
                (step, "a checkpoint that was never completed")
                for step in sorted(checkpoints.iterdir())
                if step.is_dir() and step.name.startswith("step-") and not (step / TRAINER_STATE).is_file()
            ]
    return found


def remove_leftover(path: Path) -> None:
    """Remove one of `leftovers_under`'s finds (a moved-aside output whose original is missing is put back)."""
    if path.name.endswith(".replaced"):
        original = path.parent / path.name[1 : -len(".replaced")]
        if not original.exists():
            path.rename(original)
            return
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# --- after a failed write ---------------------------------------------------------------------------------------


def remove_partial_outputs(out_dir: Path) -> list[str]:
    """What a run that failed while writing leaves out: checkpoints never completed, final files of a run that
    never wrote its summary, temporary files, and a metrics line cut short. Returns the names removed."""
    from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME

    removed = []
    root = out_dir / CHECKPOINTS
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if _STEP_DIR.match(child.name) and not (child / TRAINER_STATE).is_file():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(f"{CHECKPOINTS}/{child.name}")
    if not (out_dir / SUMMARY_FILE).is_file():  # the summary is written last: without it the final files are partial
        for name in (WEIGHTS_NAME, CONFIG_NAME, *TOKENIZER_FILES):
            if (out_dir / name).is_file():
                (out_dir / name).unlink()
                removed.append(name)
    metrics = out_dir / METRICS_FILE
    if metrics.is_file():
        text = metrics.read_bytes()
        if text and not text.endswith(b"\n"):
            metrics.write_bytes(text[: text.rfind(b"\n") + 1])
            removed.append(f"the last, unfinished line of {METRICS_FILE}")
    return removed


def disk_full_error(out_dir: Path, removed: list[str]) -> DiskFullError:
    """The one line a run that ran out of space ends with: where, what was cleaned, how to go on."""
    checkpoints = list_checkpoints(out_dir)
    cleaned = f"removed what was half-written ({', '.join(removed)}); " if removed else ""
    if checkpoints:
        step, path = checkpoints[-1]
        after = f"checkpoint {path.name} is intact: free space and continue with the same command and --resume"
    else:
        after = "no checkpoint was complete: free space and run the same command with --resume to start it again"
    return DiskFullError(f"output.dir: no space left on device in {out_dir}; {cleaned}{after}")
