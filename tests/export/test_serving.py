"""Warnings for adapter features that vLLM's loader refuses (it reads adapter_config.json before anything else)."""

from __future__ import annotations

from peftcli.export.serving import serving_warnings


def test_a_plain_lora_serves_without_warnings():
    config = {"peft_type": "LORA", "r": 8, "modules_to_save": None, "use_dora": False, "lora_bias": False}
    assert serving_warnings(config) == []


def test_each_refused_feature_is_named_once():
    config = {"peft_type": "LORA", "modules_to_save": ["lm_head", "embed_tokens"], "use_dora": True, "lora_bias": True}
    lines = serving_warnings(config)
    assert len(lines) == 3
    assert lines[0].startswith("modules_to_save (embed_tokens, lm_head): vLLM refuses")
    assert lines[1].startswith("use_dora: vLLM refuses DoRA") and lines[2].startswith("lora_bias:")
    assert all("--format safetensors" in line for line in lines)


def test_other_methods_are_pointed_to_lora_or_the_merged_model():
    (line,) = serving_warnings({"peft_type": "LOHA", "r": 8})
    assert line.startswith("LOHA adapters load in HF PEFT, but vLLM and llama.cpp serve LoRA only")
    assert "--format lora" in line
