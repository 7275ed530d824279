"""The output directory's rules: new or empty, or resumed, or deliberately overwritten, never clobbered."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from peftcli.errors import OutputError

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_run_dir(path: Path) -> bool:
    """True for a directory peftcli wrote (it holds the resolved recipe)."""
    return (path / RECIPE_FILE).is_file()


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with the output directory without touching it: 'new', 'resume' or 'overwrite'."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output.dir: {out_dir} exists and is not a directory")
    empty = not out_dir.exists() or not any(out_dir.iterdir())
    if resume:
        if list_checkpoints(out_dir):
            return "resume"
        if empty:
            return "new"  # nothing to resume yet: a preemptible job's first start
        raise OutputError(f"output.dir: {out_dir} has no checkpoint to resume (set training.save_every to make them)")
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
    """Remove an earlier run's files (only called after check_output_dir said 'overwrite')."""
    for child in out_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for _, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
