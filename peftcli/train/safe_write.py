"""Writes that never leave half a file behind, and what to do when one fails.

- `write_text_atomic`: a small file whole or not at all (temporary beside it, then renamed over it).
- `staged_dir` / `staged_file`: merged and exported outputs are written under a hidden name and published by
  a rename at the end. The hidden name records its writer (pid and host), so a second writer is refused and
  what a killed one left is recognised: `clean_leftovers` removes it before the next write, `peft clean` on
  request.
- `out_of_space`: whether a failed write failed because the disk or quota is full.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftcli.errors import DiskFullError, OutputError
from peftcli.writers import WRITER_FILE, describe, gone, me, read_holder  # noqa: F401  (imported from here too)

RETRY = "free space and run again"
NEARLY_FULL = 4 * 2**20  # bytes; see out_of_space
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.peftcli-(?P<host>.+)-(?P<pid>\d+)\.tmp$")


# --- small files --------------------------------------------------------------------------------------------------


def temp_name(path: Path) -> Path:
    """A hidden temporary beside `path` that names its writer (so a leftover is recognised as one)."""
    return path.with_name(f".{path.name}.peftcli-{socket.gethostname()}-{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a hidden temporary beside it, flushed, then renamed over it."""
    tmp = temp_name(path)
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- outputs that appear whole or not at all --------------------------------------------------------------------


def staging_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def _replaced_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.replaced"


def size_of(path: Path) -> int:
    """Bytes in a file or directory tree."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clean_leftovers(output: Path) -> list[str]:
    """Remove what a killed merge or export of `output` left beside it; returns what was done, one line each.

    An earlier output caught mid-replacement (moved aside, its successor not yet in place) is put back, never
    deleted. A staging directory whose writer is alive is another command at work: refused.
    """
    notes = []
    replaced = _replaced_dir(output)
    if replaced.exists() and not output.exists():
        replaced.rename(output)
        notes.append(f"put back {output}: an interrupted --overwrite had moved it to {replaced.name}")
    elif replaced.exists():
        notes.append(f"removed {replaced} ({size_of(replaced) / 1e9:.2f} GB), left by an interrupted --overwrite")
        shutil.rmtree(replaced, ignore_errors=True)
    tmp = staging_dir(output)
    if tmp.exists():
        holder = read_holder(tmp / WRITER_FILE)
        if holder and not gone(holder):
            raise OutputError(
                f"{output} is being written by another peft command ({describe(holder)}); wait for it, or choose "
                f"another --output (if it is gone, delete {tmp})"
            )
        notes.append(f"removed {tmp} ({size_of(tmp) / 1e9:.2f} GB), left by an interrupted merge or export")
        shutil.rmtree(tmp, ignore_errors=True)
    for leftover in dead_temp_files(output.parent, output.name):
        notes.append(f"removed {leftover} ({leftover.stat().st_size / 1e9:.2f} GB), left by an interrupted export")
        leftover.unlink(missing_ok=True)
    return notes


def dead_temp_files(directory: Path, name: str | None = None) -> list[Path]:
    """Temporary files (ours, by their names) in `directory` whose writer is gone."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _TEMP_FILE.match(path.name)
        wanted = match and (name is None or match["name"] == name) and path.is_file()
        if wanted and gone({"pid": int(match["pid"]), "host": match["host"]}):
            found.append(path)
    return found


def open_staging_dir(output: Path, overwrite: bool) -> Path:
    """An empty hidden sibling of `output` to write into, marked as this process's; refuses an existing output
    without `overwrite`."""
    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    clean_leftovers(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(output)
    try:
        tmp.mkdir()
    except FileExistsError:  # another writer started between the check and now
        raise OutputError(f"{output} is being written by another peft command; wait for it") from None
    (tmp / WRITER_FILE).write_text(json.dumps(me()), encoding="utf-8")
    return tmp


def publish_dir(tmp: Path, output: Path) -> None:
    """Put a finished staging directory in place; an existing output (with --overwrite) is replaced only now."""
    (tmp / WRITER_FILE).unlink(missing_ok=True)
    if output.exists():
        old = _replaced_dir(output)
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)


@contextmanager
def staged_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Write a directory under a hidden name and publish it at the end; on any failure nothing is left, and a
    full disk is one line that says so."""
    tmp = open_staging_dir(output, overwrite)
    with _removed_on_failure(output, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        publish_dir(tmp, output)


@contextmanager
def staged_file(output: Path, overwrite: bool) -> Iterator[Path]:
    """Write a file under a hidden name beside `output` and rename it at the end (atomic, with the usual
    permissions); on any failure nothing is left, and an output that appeared meanwhile is kept."""
    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists; pass --overwrite to replace it")
    clean_leftovers(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(output)
    with _removed_on_failure(output, lambda: tmp.unlink(missing_ok=True)):
        yield tmp
        if output.exists() and not overwrite:  # someone wrote it while we were busy
            raise OutputError(f"{output} already exists; pass --overwrite to replace it")
        os.replace(tmp, output)


@contextmanager
def _removed_on_failure(output: Path, remove) -> Iterator[None]:
    """On any failure (a signal too) `remove` the partial output; a full disk is then one line saying so."""
    try:
        yield
    except BaseException as exc:
        full = isinstance(exc, Exception) and out_of_space(exc, output.parent)
        remove()
        if full:
            raise DiskFullError(f"{no_space_message(output)}; nothing was left half-written; {RETRY}") from None
        raise


# --- a full disk --------------------------------------------------------------------------------------------------


def free_bytes(directory: Path) -> int:
    """Free bytes for this user on the filesystem holding `directory` (or its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return 1 << 62
    return stats.f_bavail * stats.f_frsize


def out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write failed for want of space.

    Python and safetensors say so (ENOSPC, EDQUOT, 'No space left on device'); torch's file writer does not
    ('unexpected pos 576 vs 534'), so for an I/O-looking error the free space where it wrote decides: a write
    that failed with under NEARLY_FULL bytes free ran out of them.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    io_like = isinstance(exc, (OSError, RuntimeError)) or "Safetensor" in type(exc).__name__
    return io_like and free_bytes(directory) < NEARLY_FULL


def check_space(output: Path, needed: int) -> None:
    """Refuse, before any work, an output the disk cannot hold (`needed` bytes, known from the plan)."""
    free = free_bytes(output.parent)
    if needed > free:
        raise DiskFullError(
            f"{output} needs {needed / 1e9:.2f} GB but its disk has {free / 1e9:.2f} GB free; free space there "
            "or choose another --output"
        )


def no_space_message(path: Path) -> str:
    return f"no space left on device while writing {path}"
