"""`peft export --format peft`: the adapter alone, in HF PEFT's format, with a model card.

For multi-LoRA serving (vLLM, TGI) and the Hub: adapter_config.json, adapter_model.safetensors, the
tokenizer the run used, and a README.md that says what the adapter is, what it was trained on and how well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from peftcli.errors import AdapterError, VerificationError
from peftcli.train.run_dir import TOKENIZER_FILES, read_recipe, read_summary
from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_weights
from peftcli.tuners.registry import all_tuners, get_tuner


def _metric_lines(summary: dict) -> list[str]:
    lines = []
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key, label in (("eval_loss", "validation loss"), ("eval_accuracy", "validation accuracy")):
        if key in after:
            start = f"{before[key]:.4f} → " if key in before else ""
            lines.append(f"- {label}: {start}{after[key]:.4f}")
    gen_before, gen_after = summary.get("generation_before") or {}, summary.get("generation_after") or {}
    if "gen_score" in gen_after:
        start = f"{gen_before['gen_score']:.2%} → " if "gen_score" in gen_before else ""
        lines.append(f"- generation score (answers matching the recipe's pattern): {start}{gen_after['gen_score']:.2%}")
    if summary.get("majority_class_rate") is not None:
        lines.append(f"- majority-class rate to beat: {summary['majority_class_rate']:.2%}")
    for key, label in (("steps", "optimizer steps"), ("train_tokens", "training tokens"), ("time_s", "seconds")):
        if summary.get(key) is not None:
            lines.append(f"- {label}: {summary[key]:,}")
    return lines


def model_card(adapter_dir: Path, method: str, raw_config: dict) -> str:
    """README.md for the exported adapter, from the run's recipe, summary and adapter config."""
    recipe, summary = read_recipe(adapter_dir), read_summary(adapter_dir)
    base = (recipe.get("model") or {}).get("name_or_path") or raw_config.get("base_model_name_or_path") or "unknown"
    spec = get_tuner(method)
    data = recipe.get("data") or {}
    train = data.get("train") or {}
    sources = train if isinstance(train, list) else [train]  # a mixed run lists each source
    tags = list(dict.fromkeys(["peftcli", method, spec.peft_type.lower()]))  # lora's method and type coincide
    front = {"base_model": base, "library_name": "peft", "tags": tags}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {adapter_dir.resolve().name}",
        "",
        f"A {method} adapter ({spec.summary}) for `{base}`, trained with peftcli.",
        "",
        "## Method",
        "",
        "```json",
        json.dumps({k: v for k, v in raw_config.items() if v not in (None, [], {})}, indent=2, sort_keys=True),
        "```",
        "",
        "## Data",
        "",
    ]
    for source in sources:
        share = f", weight {source['weight']:g}" if source.get("weight") else ""
        share += f", {source['samples']} examples" if source.get("samples") else ""
        lines.append(
            f"- training data: `{source.get('path', 'unknown')}` (format {source.get('format', 'unknown')}{share})"
        )
    if data.get("max_length"):
        lines.append(f"- sequences truncated to {data['max_length']} tokens")
    metrics = _metric_lines(summary)
    if metrics:
        lines += ["", "## Results", "", *metrics]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "path/to/this/dir")',
        "```",
        "",
        "or merge it into the base: `peft merge path/to/this/dir --base BASE_DIR`.",
        "",
    ]
    return "\n".join(lines)


def check_copy(tensors: dict, out: Path) -> None:
    """Read the written adapter back: every tensor bit for bit, or nothing is published."""
    import torch

    written = read_adapter_weights(out)
    differ = sorted(k for k in tensors.keys() | written.keys() if k not in written or k not in tensors
                    or not torch.equal(tensors[k], written[k]))  # fmt: skip
    if differ:
        raise VerificationError(
            f"{out / WEIGHTS_NAME}: {len(differ)} tensors read back differ from the run's ({differ[0]} first); "
            "nothing was written. Check the disk and export again"
        )


def export_peft(adapter_dir: Path, out: Path) -> None:
    """Write the HF PEFT adapter directory into `out` (an empty directory)."""
    method, _, raw = read_adapter_config(adapter_dir)
    spec = get_tuner(method)
    if not spec.in_hf_peft:
        hf = ", ".join(n for n, s in all_tuners().items() if s.in_hf_peft)
        what = "merge it (--format safetensors)" if spec.capabilities.mergeable else "load it with peftcli"
        raise AdapterError(
            f"method {method} has no HF PEFT format (HF PEFT has {hf}); {what} instead, or use the run "
            "directory as it is"
        )
    tensors = read_adapter_weights(adapter_dir)  # a damaged file is refused, not copied along
    shutil.copy2(adapter_dir / CONFIG_NAME, out / CONFIG_NAME)
    shutil.copy2(adapter_dir / WEIGHTS_NAME, out / WEIGHTS_NAME)
    check_copy(tensors, out)
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, out / name)
    (out / "README.md").write_text(model_card(adapter_dir, method, raw), encoding="utf-8")
