"""`model.adapter`: the trained adapter a run starts from, checked before anything loads (reads JSON only).

A run that starts from an adapter continues training that adapter's own tensors, so its result is still one
adapter on the original base: HF PEFT, `peft merge` and every server load it as they load any other. The
starting values are the starting policy, which preference objectives compare against. That needs the
recipe's method to describe the same adapter: the same method, and the same options wherever an option
changes what the adapter computes (dropout and initialisation do not: the weights are loaded over them).
Target modules are compared when the weights load, where the model names them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from peftcli.tuners.registry import tuner_for_peft_type

ADAPTER_CONFIG = "adapter_config.json"
# Options that the loaded weights overrule, or that only act while training.
_NOT_COMPARED = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")


def _compared(field: str) -> bool:
    return field not in _NOT_COMPARED and "dropout" not in field and not field.startswith("init")


def adapter_directory_problem(path: Path) -> str | None:
    """Why `path` cannot be the adapter a run starts from, or None."""
    if not path.exists():
        return f"{path} not found (relative paths are read from the current directory)"
    if not path.is_dir():
        return f"{path} is a file; give the run directory or adapter directory that holds {ADAPTER_CONFIG}"
    if (path / ADAPTER_CONFIG).is_file():
        return None
    if any(path.glob("checkpoint-*")):
        return f"{path} is an unfinished run (checkpoints, no adapter yet); finish it with `peft train --resume` first"
    return f"{path} holds no {ADAPTER_CONFIG}; give a finished run directory or an adapter directory"


def read_start_config(path: Path) -> tuple[str, BaseModel, dict]:
    """The adapter's method name, its options as our params, and its raw config; ValueError naming the file."""
    config_file = path / ADAPTER_CONFIG
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} cannot be read ({exc})") from None
    spec = tuner_for_peft_type(str(raw.get("peft_type")))
    if spec is None:
        raise ValueError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not a method peftcli can load")
    try:
        return spec.name, spec.from_hf_config(raw), raw
    except (ValueError, KeyError, ValidationError) as exc:
        raise ValueError(f"{config_file}: {exc}") from None


def method_mismatch(path: Path, method: BaseModel) -> str | None:
    """Why the recipe's `method` does not describe the adapter in `path` (one line naming the key), or None."""
    name, saved, _ = read_start_config(path)
    if name != method.name:
        return (
            f"method.name: model.adapter {path} is a {name} adapter and a run continues the adapter it starts from; "
            f"set method.name: {name} with its options, or fold it into the base first (peft merge {path}) and "
            "train on the merged model"
        )
    for field in type(method).model_fields:
        if field == "name" or not _compared(field):
            continue
        ours, theirs = getattr(method, field), getattr(saved, field, None)
        if ours != theirs:
            return f"method.{field}: {ours!r}, but model.adapter {path} was trained with {theirs!r}; set {theirs!r}"
    return None


def start_chain(path: Path) -> list[dict]:
    """What summary.json keeps about the starting adapter: the adapters before it (when it too started from
    one), then itself."""
    import hashlib

    name, _, raw = read_start_config(path)
    weights = path / "adapter_model.safetensors"
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    record = {
        "adapter": str(path.resolve()),
        "method": name,
        "base_model": raw.get("base_model_name_or_path"),
        "weights_sha256": digest.hexdigest(),
    }
    earlier: list = []
    summary = path / "summary.json"
    if summary.is_file():
        try:
            saved = json.loads(summary.read_text(encoding="utf-8"))
            record["objective"] = saved.get("objective", "sft")
            earlier = list(saved.get("start_chain") or [])
        except (OSError, json.JSONDecodeError):
            pass  # provenance only: an unreadable summary leaves the chain at this adapter
    return [*earlier, record]
