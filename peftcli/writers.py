"""Who is writing a file or directory: a record of the writing process, and whether that process is gone.

Below every layer, so the data cache (data/cache.py) and the run, merge and export outputs (train/safe_write.py)
recognise what a killed writer left the same way."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

WRITER_FILE = ".peftcli.writer"  # inside a staging directory: who is writing it


def me() -> dict:
    """This process as a lock or writer record."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def gone(holder: dict) -> bool:
    """True when a recorded writer is certainly dead: same host, and no process with its pid.

    A writer on another host cannot be checked and counts as alive (a shared filesystem)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    return False


def read_holder(path: Path) -> dict:
    """A lock or writer record; {} when missing, being written this instant, or damaged."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
