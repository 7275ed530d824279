"""QLoRA and 8-bit training from recipes on the tiny Llama: learning, what is saved, HF PEFT and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftcli.models.hardware import cpu_has_native_bf16
from peftcli.models.load import default_device, load_base_model
from peftcli.recipe.load import load_recipe
from peftcli.train.loop import train
from peftcli.train.run_dir import list_checkpoints
from peftcli.tuners.adapter import load_adapter

from support import make_recipe, run_cli, without_cpu_repacking, write_recipe

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

QUANTIZATIONS = {"nf4": {"bits": 4, "compute_dtype": "fp32"}, "int8": {"bits": 8}}


def _recipe(tmp_path, tiny_model_dir, copy_data, quant: str, **sections):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, model={"quantization": QUANTIZATIONS[quant]}, **sections)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))


def _hf_quantized(tiny_model_dir, quant: str, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=config, device_map={"": device}, dtype=torch.float32
    )
    return without_cpu_repacking(model).eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("quant", sorted(QUANTIZATIONS))
def test_quantized_base_trains_and_the_adapter_loads_in_hf_peft(
    quant, dora, tmp_path, tiny_model_dir, copy_data, one_torch_thread
):
    from peft import PeftModel

    recipe = _recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        quant,
        method={"r": 4, "dora": dora},
        training={"max_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "seed": 3, "eval_every": 10},
    )
    summary = train(recipe)  # evaluates at steps 0, 10 and 20 between training steps, then at the end
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert after < 0.85 * before, f"validation loss {before:.3f} -> {after:.3f}"
    expected_kind = "nf4 (4-bit" if quant == "nf4" else "int8 (LLM.int8"
    assert summary["quantization"].startswith(expected_kind)

    run = tmp_path / "run"
    tensors = load_file(str(run / "adapter_model.safetensors"))
    b_norms = {k: float(t.norm()) for k, t in tensors.items() if ".lora_B." in k}
    assert len(b_norms) == 14 and all(n > 0 for n in b_norms.values()), "every layer's B left zero: it learned"
    assert all(t.dtype == torch.float32 for t in tensors.values())
    if dora:
        assert sum(".lora_magnitude_vector" in k for k in tensors) == 14

    # The same adapter in HF PEFT, on a base quantized by transformers alone, gives our outputs.
    device = default_device()  # the GPU where there is one (the loop trained there too)
    ours = load_base_model(recipe.model).eval()
    load_adapter(ours, run)
    theirs = PeftModel.from_pretrained(_hf_quantized(tiny_model_dir, quant, device), run).eval()
    ids = torch.randint(5, 390, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


class _StopAfter:
    def __init__(self, stop_step: int):
        self.stop_step = stop_step

    def start(self, plan): ...
    def evaluation(self, metrics): ...
    def message(self, text): ...
    def finish(self, summary): ...

    def step(self, metrics):
        if metrics["step"] == self.stop_step:
            raise RuntimeError("simulated crash")


def test_qlora_with_8bit_adam_and_checkpointing_resumes_exactly(tmp_path, tiny_model_dir, copy_data, one_torch_thread):
    sections = dict(
        method={"r": 4, "dropout": 0.1},
        training={
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "save_every": 3,
            "optimizer": "adamw_8bit",
            "activation_checkpointing": True,
        },
    )
    train(_recipe(tmp_path / "a", tiny_model_dir, copy_data, "nf4", **sections))
    broken = _recipe(tmp_path / "b", tiny_model_dir, copy_data, "nf4", **sections)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, reporter=_StopAfter(5))
    summary = train(broken, resume=True)
    assert summary["steps"] == 6 and summary["optimizer"] == "adamw_8bit"
    a = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    # The 8-bit optimizer state went into the checkpoint (and back): without it the runs would part.
    (_, checkpoint), *_ = list_checkpoints(tmp_path / "b" / "run")
    state = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]
    assert moments and all({"state1", "state2"} <= set(m) for m in moments)


def test_peft_train_shows_the_quantized_base(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        model={"quantization": {"bits": 4, "quant_type": "fp4", "double_quant": False}},
        training={"max_steps": 2, "optimizer": "paged_adamw_8bit"},
    )
    result = run_cli("train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stderr.split())  # progress goes to stderr; rich may wrap long lines
    compute = "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"  # compute_dtype: auto
    assert f"base quantized: fp4 (4-bit, compute {compute}) in 14 linear layers; optimizer paged_adamw_8bit" in shown
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["quantization"].startswith("fp4") and saved["optimizer"] == "paged_adamw_8bit"
