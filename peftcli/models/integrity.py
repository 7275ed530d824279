"""Refuse a base model whose files are incomplete or do not fit its config, in one line that says what to do.

Before loading: what a local path holds (a file instead of a model directory, an empty directory, no
config.json, no weights). After loading: the weights transformers could not fill from the checkpoint and the
checkpoint tensors it had no place for. transformers only logs those (and we silence that log), so without
this check a damaged checkpoint trains on randomly initialised weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from peftcli.errors import ModelError

# Any of these tells that a directory holds weights; which one it needs, transformers says itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
CLASSIFIER_TASKS = ("seq_cls", "token_cls")
SHOWN = 3  # names listed before "and N more"


def check_model_path(name: str, *, weights: bool = True) -> None:
    """Refuse a local model.name_or_path that cannot be a model: a file other than a .gguf, an empty directory,
    one without config.json, or (with `weights`) one without a weights file.

    Hub ids and paths that do not exist are left to the loader, which explains those.
    """
    path = Path(name).expanduser()
    if not path.exists() or name.lower().endswith(".gguf"):
        return
    where = f"model.name_or_path: {name}: "
    _refuse_a_file(path, where, "model directory (the folder holding config.json and the weights)", "config.json")
    files = {child.name for child in path.iterdir()}
    if not files:
        raise ModelError(
            f"{where}the directory is empty; it must be a model directory holding config.json and the weights "
            "(model.safetensors or pytorch_model.bin)"
        )
    if "config.json" not in files:
        if "adapter_config.json" in files:
            raise ModelError(
                f"{where}holds an adapter (adapter_config.json), not a base model; point model.name_or_path at "
                "the base model it was trained on"
            )
        inner = sorted(str(p.parent) for p in path.glob("*/config.json")) + sorted(str(p) for p in path.glob("*.gguf"))
        hint = f"; did you mean {inner[0]}?" if len(inner) == 1 else ""
        raise ModelError(
            f"{where}has no config.json; it is not a model directory (the folder holding config.json and the "
            f"weights){hint}"
        )
    if weights and not any(file.endswith(WEIGHT_SUFFIXES) for file in files):
        raise ModelError(
            f"{where}has no weights file (model.safetensors or pytorch_model.bin); it is not a complete model "
            "directory: download or copy the weights into it"
        )


def _refuse_a_file(path: Path, where: str, wanted: str, marker: str) -> None:
    """A file where a directory belongs: say what belongs there, and point at its folder when that is one."""
    if path.is_file():
        hint = f"; use its folder {path.parent}" if (path.parent / marker).is_file() else ""
        raise ModelError(f"{where}is a file; it must be a {wanted} or a .gguf file{hint}")


def check_tokenizer_path(name: str) -> None:
    """Refuse a local model.tokenizer that is a file other than a .gguf, or an empty directory."""
    path = Path(name).expanduser()
    if not path.exists() or name.lower().endswith(".gguf"):
        return
    where = f"model.tokenizer: {name}: "
    wanted = "tokenizer directory (the folder holding tokenizer_config.json)"
    _refuse_a_file(path, where, wanted, "tokenizer_config.json")
    if not any(path.iterdir()):
        raise ModelError(f"{where}the directory is empty; it must hold the tokenizer files (tokenizer_config.json)")


def check_loaded_weights(name: str, task: str, model: nn.Module, info: dict, *, gguf: bool = False) -> None:
    """Refuse a checkpoint that left weights of the model unfilled, held tensors the model has no place for,
    or disagreed with the config about a tensor's shape. `info` is from_pretrained's output_loading_info.

    transformers already leaves out tied weights (lm_head tied to the embeddings), non-persistent buffers
    and the keys a model class declares ignorable (_keys_to_ignore_on_load_missing/unexpected).
    """
    where = f"model.name_or_path: {name}: "
    config = "the GGUF metadata" if gguf else "config.json"
    expected = _expected_difference(task, model)
    buffers = {key for key, _ in model.named_buffers()}
    mismatched = [m for m in info["mismatched_keys"] if not expected(m[0])] + _quantized_mismatches(model)
    mismatched.sort(key=lambda m: _natural(m[0]))
    if mismatched:
        key, stored, wanted = mismatched[0]
        more = f" ({len(mismatched)} tensors differ)" if len(mismatched) > 1 else ""
        raise ModelError(
            f"{where}{config} and the weights disagree: {key} is {list(stored)} in the checkpoint but "
            f"{list(wanted)} in the model {config} describes{more}; use the config.json saved with these weights"
        )
    # A missing buffer is one the model computes itself (a mask, rotary frequencies), not a learned weight.
    missing = [key for key in info["missing_keys"] if not expected(key) and key not in buffers]
    unexpected = [key for key in info["unexpected_keys"] if not expected(key)]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"lacks {_count(missing)} the model needs ({_names(missing)})")
    if unexpected:
        parts.append(f"has {_count(unexpected)} the model has no place for ({_names(unexpected)})")
    if missing and unexpected:
        advice = f"the weights belong to another architecture than {config} describes"
    elif missing:
        advice = "it is incomplete or belongs to another architecture: download or convert it again"
    else:
        advice = f"it holds more than {config} describes (more layers or another architecture)"
    raise ModelError(f"{where}the checkpoint {' and '.join(parts)}; {advice}")


def _expected_difference(task: str, model: nn.Module):
    """Which keys may differ between checkpoint and model by design: a predicate on a key."""

    def pooler(key: str) -> bool:
        # BERT-style bodies carry a pooler that only sequence classification uses: a token classifier or an LM
        # drops the checkpoint's, and a classifier built from an MLM checkpoint initialises its own.
        return "pooler" in key.split(".")

    prefix = getattr(model, "base_model_prefix", "")
    if task not in CLASSIFIER_TASKS or not prefix or getattr(model, prefix, None) is None:
        return pooler

    def head(key: str) -> bool:
        # Outside the body is the task head: the classifier's own is initialised afresh or resized (see
        # _size_head), and the checkpoint's head for its own task (a causal LM's lm_head, an MLM's
        # cls.predictions) is dropped on purpose. Every key inside the body must still match.
        return not key.startswith(f"{prefix}.") or pooler(key)

    return head


def _quantized_mismatches(model: nn.Module) -> list[tuple[str, tuple, tuple]]:
    """Layers bitsandbytes quantized from a tensor of another shape: transformers does not compare those."""
    from peftcli.models.quantized_layers import quantized_kind

    found = []
    for name, module in model.named_modules():
        kind = quantized_kind(module)
        if kind is None:
            continue
        # A 4-bit weight is packed; its quant state keeps the shape it was quantized from. 8-bit keeps its own.
        state = getattr(module.weight, "quant_state", None)
        stored = module.weight.shape if kind == "8-bit" else getattr(state, "shape", None)
        wanted = (module.out_features, module.in_features)
        if stored is not None and tuple(stored) != wanted:
            found.append((f"{name}.weight", tuple(stored), wanted))
    return found


def _natural(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _count(keys: list[str]) -> str:
    return f"{len(keys)} weight" + ("s" if len(keys) > 1 else "")


def _names(keys: list[str]) -> str:
    """The first few keys in model order, and how many more."""
    keys = sorted(keys, key=_natural)
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
