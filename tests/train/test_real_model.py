"""The real SmolLM2-135M-Instruct: the quickstart recipe at reduced steps, and a GGUF base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftcli.examples.assets import SMOLLM2_GGUF, cache_dir

from support import REPO, run_cli

pytestmark = pytest.mark.slow


def test_quickstart_lowers_validation_loss(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli(
        "train",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--set", "training.max_steps=6",
        "--set", "training.eval_generation=null",
        "--set", "training.save_every=null",
        "--set", "data.validation.max_samples=16",
        "--set", "data.max_length=256",
        "--set", f"output.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert math.isfinite(before) and after < before, (before, after)
    assert "validation loss" in result.stderr
    _assert_hf_peft_loads_it_the_same(out)


def _assert_hf_peft_loads_it_the_same(adapter_dir: Path) -> None:
    """The trained adapter on the real base: HF PEFT and peftcli give the same logits, and not the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli.tuners.adapter import load_adapter

    base_dir = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "A farmer has 12 cows and buys 7 more. How many cows?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    def base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    ours = base()
    load_adapter(ours, adapter_dir)
    theirs = PeftModel.from_pretrained(base(), str(adapter_dir)).eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(**inputs).logits, theirs(**inputs).logits
        base_logits = base()(**inputs).logits
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4
    assert (ours_logits - base_logits).abs().max().item() > 1e-3


def test_train_on_a_gguf_base(tmp_path):
    gguf = cache_dir() / "models" / SMOLLM2_GGUF
    assert gguf.is_file(), "run `python -m peftcli.examples` (make setup) first"
    out = tmp_path / "gguf"
    result = run_cli(
        "train",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--set", f"model.name_or_path={gguf}",
        "--set", "model.dtype=auto",
        "--set", "method.target_modules=[q_proj,v_proj]",
        "--set", "training.max_steps=1",
        "--set", "training.eval_generation=null",
        "--set", "training.eval_at_start=false",
        "--set", "training.save_every=null",
        "--set", "training.precision=fp32",
        "--set", "data.validation=null",
        "--set", "data.max_length=128",
        "--set", f"output.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gguf)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    weights = load_file(str(Path(out) / "adapter_model.safetensors"))
    assert len(weights) == 2 * 60  # lora_A and lora_B of 30 layers x (q_proj, v_proj)


def test_qlora_quickstart_trains_on_the_4bit_real_model(tmp_path):
    """recipes/quickstart-qlora.yaml for two steps, with an evaluation and a generation before them."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftcli.tuners.adapter import load_adapter

    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = run_cli(
        "train",
        str(REPO / "recipes" / "quickstart-qlora.yaml"),
        "--set", "training.max_steps=2",
        "--set", "training.eval_generation.prompts=1",
        "--set", "training.eval_generation.max_new_tokens=8",
        "--set", "training.save_every=null",
        "--set", "data.validation.max_samples=4",
        "--set", "data.max_length=256",
        "--set", f"output.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base quantized: nf4 (4-bit, double quantization" in " ".join(result.stderr.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["optimizer"] == "adamw_8bit"
    assert math.isfinite(summary["eval_after"]["eval_loss"])
    # Evaluation and generation ran before the first step: had they broken the 4-bit backward pass, some
    # B factors would still be zero after two steps.
    tensors = load_file(str(out / "adapter_model.safetensors"))
    b_factors = [t for k, t in tensors.items() if ".lora_B." in k]
    assert len(b_factors) == 30 * 7 and all(float(t.abs().max()) > 0 for t in b_factors)
    # The QLoRA adapter is an ordinary adapter: it loads onto the unquantized base.
    base_dir = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    info = load_adapter(plain, out)
    assert info.method == "lora" and len(info.targeted) == 210
