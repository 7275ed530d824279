"""What popular adapter servers refuse in an exported adapter, said before someone deploys it.

vLLM's loader (vllm/lora/peft_helper.py) rejects an adapter_config.json with modules_to_save, use_dora or an
adapter bias, and serves LoRA only; the adapter still loads in HF PEFT. The merged model
(`peft export --format safetensors`) serves anywhere.
"""

from __future__ import annotations

MERGED = "serve the merged model (peft export --format safetensors) there instead"


def serving_warnings(config: dict) -> list[str]:
    """One line per feature of `config` (an adapter_config.json) that vLLM refuses."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        return [
            f"{peft_type or 'this'} adapters load in HF PEFT, but vLLM and llama.cpp serve LoRA only; "
            f"convert with --format lora or {MERGED}"
        ]
    lines = []
    if config.get("modules_to_save"):
        saved = ", ".join(sorted(config["modules_to_save"]))
        lines.append(f"modules_to_save ({saved}): vLLM refuses adapters that carry whole modules; {MERGED}")
    if config.get("use_dora"):
        lines.append(f"use_dora: vLLM refuses DoRA adapters; {MERGED}")
    if config.get("lora_bias"):
        lines.append(f"lora_bias: vLLM refuses adapters with a bias; {MERGED}")
    return lines
