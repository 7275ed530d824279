"""`peft recipe import`: turn another tool's training config (Axolotl, LLaMA-Factory, HF TrainingArguments/TRL,
ms-swift, Oumi) into a peftcli recipe, listing every key that could not be carried over and writing out the source
tool's defaults where they differ from peftcli's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from peftcli.errors import OutputError
from peftcli.recipe.importers import axolotl, hf, llama_factory, ms_swift, oumi
from peftcli.recipe.importers.common import read_source
from peftcli.recipe.importers.finish import validated
from peftcli.recipe.importers.result import ConfigImportError, ImportResult, Unmapped

IMPORTERS = {"axolotl": axolotl, "llama-factory": llama_factory, "hf": hf, "ms-swift": ms_swift, "oumi": oumi}

__all__ = ["IMPORTERS", "ConfigImportError", "ImportResult", "Unmapped", "import_config", "render", "write_atomic"]


def detect_tool(path: Path, data: dict) -> str:
    """The tool whose keys the config uses most clearly, or a one-line error asking for --from."""
    scores = {name: module.detect_score(data) for name, module in IMPORTERS.items()}
    best = max(scores.values())
    leaders = [name for name, score in scores.items() if score == best]
    if best < 2 or len(leaders) > 1:
        raise ConfigImportError(f"{path}: cannot tell which tool this config is for; pass --from {'|'.join(IMPORTERS)}")
    return leaders[0]


def import_config(path: str | Path, tool: str | None = None) -> ImportResult:
    """Read a config, convert it with `tool`'s importer (detected when None) and validate the recipe."""
    path = Path(path)
    if tool is not None and tool not in IMPORTERS:
        raise ConfigImportError(f"--from {tool}: unknown tool; use one of {', '.join(IMPORTERS)}")
    data = read_source(path)
    tool = tool or detect_tool(path, data)
    return validated(IMPORTERS[tool].convert(path, data))


def render(result: ImportResult) -> str:
    """The recipe YAML, headed by comments: where it came from, the unmapped keys, the defaults written out."""
    lines = [f"# Imported by `peft recipe import` from {result.tool} config {result.source}."]
    if result.unmapped:
        lines.append("# Keys not carried over, or only approximately (key: reason):")
        lines += [f"#   {item.line()}" for item in result.unmapped]
    if result.defaults:
        lines.append(f"# {result.tool} defaults written out (peftcli's own default differs or may differ):")
        lines += [f"#   {key}: {value!r} ({why})" for key, value, why in result.defaults]
    body = yaml.safe_dump(result.recipe, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(lines) + "\n" + body


def write_atomic(path: Path, text: str, overwrite: bool) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it, or choose another -o")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name with -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's file is private; a recipe gets an ordinary file's mode
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
