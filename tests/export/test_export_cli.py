"""`peft export`: safetensors (merged, sharded), peft (adapter + model card) and gguf from a trained run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli.examples.tiny import write_tiny_model
from peftcli.recipe.load import load_recipe
from peftcli.train.loop import train

from support import make_recipe, run_cli, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, copy_data):
    """A short real training run on a tiny Llama saved in shards."""
    tmp = tmp_path_factory.mktemp("export")
    base = write_tiny_model(tmp / "base", max_shard_size="60KB")
    recipe = make_recipe(tmp, base, copy_data, training={"max_steps": 4, "eval_every": 2})
    train(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
    return tmp / "run"


def test_export_safetensors_is_a_sharded_merged_model(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = run_cli("export", str(trained_run), "--format", "safetensors", "-o", str(out), "--max-shard-size", "70KB")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    # verified by default before it was published: the logit difference and the bound bf16 rounding sets
    assert "verify: max |logit difference| between base + adapter and the merged model" in result.stdout
    again = run_cli("export", str(trained_run), "-f", "safetensors", "-o", str(out), "--overwrite", "--no-verify")
    assert again.returncode == 0, again.stderr
    assert "verify:" not in again.stdout


def test_export_peft_reads_back_what_it_wrote(trained_run, tmp_path, monkeypatch):
    """A copy that comes out different (a failing disk) is caught before the output is published."""
    import shutil

    from safetensors.torch import save_file

    from peftcli.cli.export import _export_peft
    from peftcli.errors import VerificationError
    from peftcli.export import peft_format

    copy = shutil.copy2

    def damaging_copy(src, dst):
        copy(src, dst)
        if str(dst).endswith("adapter_model.safetensors"):
            tensors = load_file(str(dst))
            first = sorted(tensors)[0]
            tensors[first] = tensors[first] + 1
            save_file(tensors, str(dst))

    monkeypatch.setattr(peft_format.shutil, "copy2", damaging_copy)
    out = tmp_path / "peft"
    with pytest.raises(VerificationError, match="tensors read back differ"):
        _export_peft(trained_run, out, overwrite=False, is_adapter=True)
    assert not out.exists()


def test_export_peft_writes_the_adapter_and_a_model_card(trained_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    result = run_cli("export", str(trained_run), "--format", "peft", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) >= ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "library_name: peft" in card and "validation loss:" in card
    assert "copy.jsonl" in card  # the training data is named
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["peftcli", "lora"]  # the method and its PEFT type are both lora: one tag
    ours = load_file(str(trained_run / "adapter_model.safetensors"))
    assert ours.keys() == load_file(str(out / "adapter_model.safetensors")).keys()
    assert "warning:" not in result.stderr  # a plain LoRA adapter: nothing a server refuses
    config = json.loads((out / "adapter_config.json").read_text())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)


def test_export_gguf_from_a_run_merges_first(trained_run, tmp_path):
    out = tmp_path / "model.gguf"
    result = run_cli("export", str(trained_run), "--format", "gguf", "--quant", "q8_0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"], "the scratch merge is gone"
    # read back against the merged weights before it was published
    assert "verify: read back the metadata and 21 tensors, each within its storage type's rounding bound" in (
        result.stdout
    )
    again = run_cli("export", str(trained_run), "--format", "gguf", "-o", str(out))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


def test_export_refusals(trained_run, tmp_path):
    bad = run_cli("export", str(trained_run), "--format", "onnx")
    assert bad.returncode == 2 and "--format: 'onnx' is not one of safetensors, peft, gguf" in bad.stderr
    quant = run_cli("export", str(trained_run), "--format", "gguf", "--quant", "q2_k", "-o", str(tmp_path / "x"))
    assert quant.returncode == 2 and "--quant: 'q2_k' is not one of" in quant.stderr
    assert not any(tmp_path.iterdir())


def test_gguf_refuses_a_base_it_cannot_write_before_merging(trained_run, tmp_path):
    import shutil

    import yaml

    # The run's base labelled Phi3: an architecture the GGUF writer does not cover.
    recipe = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    other = tmp_path / "phi3-base"
    shutil.copytree(recipe["model"]["name_or_path"], other)
    config = json.loads((other / "config.json").read_text())
    config.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "model.gguf"
    result = run_cli("export", str(trained_run), "--format", "gguf", "--base", str(other), "-o", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {trained_run} (base {other}): gguf export supports LlamaForCausalLM, MistralForCausalLM, "
        "Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, not "
        "Phi3ForCausalLM; export --format safetensors instead and convert with llama.cpp's own converter"
    )
    assert "merged" not in result.stdout + result.stderr  # refused before any merge
    assert not (tmp_path / "out").exists()


def test_export_peft_warns_about_what_vllm_refuses(tmp_path, tiny_model_dir, copy_data):
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data, method={"modules_to_save": ["lm_head"]},
                         training={"max_steps": 1})  # fmt: skip
    train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    result = run_cli("export", str(tmp_path / "run"), "--format", "peft", "-o", str(tmp_path / "peft"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "modules_to_save (lm_head): vLLM refuses" in warnings[0], result.stderr
