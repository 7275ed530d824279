"""Which recipe changes a run can resume under. A checkpoint holds an adapter of given shapes, optimizer
moments, a position in a given order of given data, and per-process random states: changing what shaped
any of these would silently train something else, so such changes are refused by name before anything
loads. Changes that only say how long to go on or what to report are allowed."""

from __future__ import annotations

from pathlib import Path

import yaml

from peftcli.errors import OutputError

# Dotted keys (or their prefixes) that may change between a run and its resume.
RESUMABLE = (
    "training.max_steps",
    "training.epochs",
    "training.eval_every",
    "training.eval_at_start",
    "training.eval_generation",
    "training.save_every",
    "training.keep_checkpoints",
    "training.log_every",
    "training.report_to",  # trackers only receive what the run logs
    "training.tracking",
    "training.activation_checkpointing",  # recomputes the same values
    "training.cross_entropy",  # the same loss, checked against full logits
    "training.compile",
    "model.name_or_path",  # the same base, moved
    "launch.main_address",
    "launch.main_port",
    "launch.node_rank",
)


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


_MISSING = object()


def _schema_default(key: str):
    """The value a recipe gets for a dotted key it does not set (a section's own default), or _MISSING."""
    from pydantic import BaseModel

    from peftcli.recipe.schema import Recipe

    first, *rest = key.split(".")
    field = Recipe.model_fields.get(first)
    if field is None or field.is_required():
        return _MISSING
    value = field.get_default(call_default_factory=True)
    for part in rest:
        value = getattr(value, part, _MISSING) if isinstance(value, BaseModel) else _MISSING
    return value


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose value differs between two recipes as plain data. A key the saved recipe lacks (it
    was written by an earlier version) counts as unchanged while the current value is its default."""
    old, new = _flatten(saved), _flatten(current)
    return sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and not (k not in old and new.get(k) == _schema_default(k))
    )


def _resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE)


def check_resume_changes(saved_recipe: Path, current: dict) -> list[str]:
    """The allowed changes (for a note); refuses the others by name, with what to do."""
    if not saved_recipe.is_file():
        return []
    changed = changed_keys(yaml.safe_load(saved_recipe.read_text(encoding="utf-8")) or {}, current)
    refused = [key for key in changed if not _resumable(key)]
    if refused:
        raise OutputError(
            f"--resume: the recipe differs from the run's {saved_recipe} in {', '.join(refused)}, which the "
            "checkpoint depends on; undo the change, or start a new run (another output.dir, or --overwrite)"
        )
    return changed
