"""Warnings for adapter parts that vLLM or llama.cpp refuse, skip or scale otherwise than HF PEFT (each traced to
the servers' source in peftcli/export/serving.py), on hand-made configs and on adapters as peftcli writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftcli.export.safetensors_stream import read_header
from peftcli.export.serving import serving_warnings
from peftcli.tuners.adapter import apply_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


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


def _saved(model, tmp_path: Path, params) -> tuple[dict, dict]:
    """adapter_config.json and the weight file's {name: shape} of `params` applied to `model`, as written."""
    apply_adapter(model, params, AdapterContext())
    save_adapter(model, tmp_path, base_model_name_or_path="base")
    tensors = {name: info.shape for name, info in read_header(tmp_path / "adapter_model.safetensors")[0].items()}
    return json.loads((tmp_path / "adapter_config.json").read_text()), tensors


def test_expert_parameters_are_named_with_what_vllm_needs(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    lora = get_tuner("lora")
    both = lora.params(r=2, target_modules=["q_proj"], dropout=0.0, target_parameters=EXPERTS)
    saved, tensors = _saved(MixtralForCausalLM(config), tmp_path / "both", both)
    (line,) = serving_warnings(saved, tensors)  # q_proj is plain LoRA; the experts are not
    assert line.startswith("target_parameters (mlp.experts.down_proj, mlp.experts.gate_up_proj; 4 expert parameter")
    assert "vLLM serves LoRA on fused experts only for MoE models" in line and "only one of the two" not in line
    assert line.endswith("--format safetensors) there instead")

    one = lora.params(r=2, target_modules=[], dropout=0.0, target_parameters=EXPERTS[:1])
    saved, tensors = _saved(MixtralForCausalLM(config), tmp_path / "one", one)
    (line,) = serving_warnings(saved, tensors)
    assert "here model.layers.0.mlp.experts, model.layers.1.mlp.experts adapt(s) only one of the two" in line


def test_lora_on_the_embedding_and_the_head_is_named(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = get_tuner("lora").params(r=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
    saved, tensors = _saved(model, tmp_path, params)
    (line,) = serving_warnings(saved, tensors)
    assert line.startswith("LoRA on lm_head, model.embed_tokens: vLLM adapts embed_tokens and lm_head only on")
    assert "llama.cpp's converter refuses lm_head when the base ties it" in line
    # without the weight file, the config's module names say the same
    assert serving_warnings({"peft_type": "LORA", "target_modules": ["q_proj", "embed_tokens"]})[0].startswith(
        "LoRA on embed_tokens: vLLM adapts"
    )


def test_a_convolution_is_named():
    tensors = {"base_model.model.conv.lora_A.weight": (4, 3, 3, 3), "base_model.model.conv.lora_B.weight": (8, 4, 1, 1)}
    (line,) = serving_warnings({"peft_type": "LORA", "r": 4, "lora_alpha": 4}, tensors)
    assert line.startswith("LoRA on convolutions (conv): vLLM has no LoRA layer for them")


def _factors(ranks: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {f"base_model.model.{name}.lora_A.weight": (r, 64) for name, r in ranks.items()}


def test_per_layer_scales_each_server_would_get_wrong_are_named():
    ranks = {"model.layers.0.mlp.up_proj": 16, "model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.up_proj": 4}
    # what export --format lora --energy writes: alpha = r per layer, so every layer's scale is 1
    pattern = {f"^{re.escape(name)}": r for name, r in ranks.items() if r != 16}
    converted = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "rank_pattern": pattern,
                 "alpha_pattern": {key: float(r) for key, r in pattern.items()}}  # fmt: skip
    (line,) = serving_warnings(converted, _factors(ranks))  # vLLM's one lora_alpha / r is right for all of them
    assert line.startswith("model.layers.0.self_attn.q_proj, model.layers.1.mlp.up_proj: llama.cpp scales each layer")
    assert "(model.layers.0.self_attn.q_proj: 2x)" in line and "--format gguf" in line
    # a trained LoRA with a rank_pattern and one alpha: HF PEFT scales by alpha / the layer's rank, as llama.cpp does
    trained = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "rank_pattern": converted["rank_pattern"]}
    (line,) = serving_warnings(trained, _factors(ranks))
    assert line.startswith("model.layers.0.self_attn.q_proj, model.layers.1.mlp.up_proj: vLLM keeps r and lora_alpha")
    assert "(model.layers.0.self_attn.q_proj: 0.5x)" in line
    # rsLoRA: llama.cpp divides by the rank, not its square root
    rslora = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "use_rslora": True}
    (line,) = serving_warnings(rslora, _factors(dict.fromkeys(ranks, 16)))
    assert "(3 in all)" not in line and "(use_rslora is not carried into GGUF)" in line
    assert "(model.layers.0.mlp.up_proj: 0.25x)" in line
    # one rank, one alpha: nothing to say
    assert serving_warnings({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, _factors(dict.fromkeys(ranks, 16))) == []
