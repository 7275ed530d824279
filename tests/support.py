"""Helpers shared by the tests (importable as `support`; pyproject puts tests/ on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def make_recipe(tmp_path: Path, model_dir: Path, data_path: Path, **sections) -> dict:
    """A small valid recipe as a dict; keyword sections are merged over the defaults."""
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {
            "train": {"path": str(data_path), "format": "prompt_completion"},
            "validation": {"fraction": 0.1},
            "max_length": 64,
        },
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write a recipe dict as YAML."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m peftcli ARGS` as a user would, capturing output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def without_cpu_repacking(model):
    """An HF oracle model with bitsandbytes' AVX512-BF16 repacking off, as our loader sets it.

    On CPUs with AVX512-BF16, a 4-bit layer repacks its weight in place on its first no-grad forward and
    multiplies by another kernel from then on (logits here moved by 1e-3 on the bare base, 0.34 with a
    trained LoRA, 5.5 with DoRA, which dequantizes the repacked bytes). Our loader turns that off
    (peftcli/models/quantize.py); the oracle must compute the same way to be comparable.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# What HF peft says when it cannot find the cache argument of a model (BERT with a task head takes it through
# **kwargs only).
BERT_PREFIX_REFUSED = "HF peft refuses prefix tuning on BERT ('Model does not support past key values')"


def skip_where_hf_peft_predates_the_cache_rename(what: str) -> None:
    """Skip an oracle check that HF peft itself gets wrong with this transformers, naming both versions.

    transformers 5.24 renamed the forward and `generate` argument `past_key_values` to `cache`; HF peft up to
    0.21.2 still uses the old name, which breaks its prefix tuning. Our side of these checks is tested without
    HF peft as well (generation against a greedy loop without cache). A newer HF peft runs the check again.
    """
    transformers_version, peft_version = Version(version("transformers")), Version(version("peft"))
    if transformers_version >= Version("5.24") and peft_version <= Version("0.21.2"):
        pytest.skip(
            f"HF peft {peft_version} with transformers {transformers_version}: {what}; HF peft still passes "
            "`past_key_values`, which transformers 5.24 renamed to `cache`"
        )


# --- comparing models ------------------------------------------------------------------------------------------


def logits(model, inputs=None, **kwargs):
    """The model's output logits without gradients; `inputs` is a tensor of input ids or a dict of inputs."""
    import torch

    if isinstance(inputs, dict):
        kwargs = {**inputs, **kwargs}
    elif inputs is not None:
        kwargs["input_ids"] = inputs
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b) -> float:
    """The largest absolute difference of two finite tensors (compared in fp32)."""
    import torch

    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.float() - b.float()).abs().max().item()


def perturb(model, seed: int = 0, scale: float = 0.1) -> int:
    """Seeded N(0, scale²) noise on every trainable parameter (ours or HF's); returns how many were changed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_((torch.randn(param.shape, generator=gen) * scale).to(param))
                count += 1
    return count
