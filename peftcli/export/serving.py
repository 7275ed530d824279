"""What popular adapter servers refuse, skip or scale otherwise in an exported adapter, said before someone
deploys it. Each line names the modules it is about and what to do; each rests on the servers' own code:

vLLM
- vllm/lora/peft_helper.py: adapter_config.json with modules_to_save or use_dora is refused. Only r,
  lora_alpha and use_rslora are kept (`from_dict` drops every other key, rank_pattern and alpha_pattern
  included), and one scale, lora_alpha / r (/ sqrt(r) with rsLoRA), is computed for the whole adapter;
  vllm/lora/lora_model.py builds every module's weights from that config alone
  (lora_weights.py, `LoRALayerWeights.from_config(module_name, peft_helper)`). A layer whose own rank or
  alpha gives it another scale in HF PEFT is served at the wrong strength, silently.
- vllm/lora/lora_model.py (`check_unexpected_modules`) with vllm/lora/utils.py (`get_supported_lora_modules`):
  a module is accepted when its last name is a linear layer of vLLM's model or one of the embedding modules
  the model class declares (`embedding_modules`: embed_tokens and lm_head on Llama, Qwen3 and others, none
  on some). LoRA on embed_tokens or lm_head is refused on the other architectures.
- vllm/lora/model_manager.py (`_stack_moe_lora_weights`): HF PEFT's fused-expert layout (target_parameters:
  `experts.base_layer` read as gate_up_proj, `experts` as down_proj) is read on MoE models whose vLLM class
  sets `is_3d_moe_weight` (GPT-OSS, Qwen3.5-MoE, Qwen3-VL-MoE, ...), and it asserts that both are adapted.
- vllm/lora/layers/: LoRA layers exist for linear layers, embeddings, the output head and fused experts; none
  for convolutions.

llama.cpp
- convert_lora_to_gguf.py: writes one `adapter.lora.alpha` (lora_alpha) and reads no other scale setting
  (use_rslora, rank_pattern, alpha_pattern); src/llama-adapter.h (`get_scale`) scales each layer by
  alpha / that layer's own rank. A layer whose HF PEFT scale differs is served at the wrong strength.
- convert_lora_to_gguf.py takes lora_A / lora_B weights (and lora_embedding_A / B) only: it stops on DoRA's
  magnitude vectors, LoRA biases and whole modules, except norm weights, which it keeps;
  src/llama-adapter.cpp then skips every `_norm.weight` tensor without a word. It also refuses LoRA on lm_head
  when the base ties lm_head to the embedding.

Not confirmed here, so not warned about: what vLLM does with fused-expert LoRA on MoE models without
`is_3d_moe_weight` (it expects per-expert weights there), what llama.cpp's converter does with fused-expert
LoRA, and LoRA on modules outside a multimodal model's language model (peftcli trains text models only).
The merged model (`peft export --format safetensors`, or `--format gguf` for llama.cpp) serves anywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from peftcli.tuners.lora.patterns import pattern_value

MERGED = "serve the merged model (peft export --format safetensors) there instead"
MERGED_GGUF = "for llama.cpp export the merged model (peft export --format gguf) instead"
PREFIX = "base_model.model."


def _named(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def _lora_modules(tensors: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> the shape of its lora_A (lora_embedding_A for an embedding), from the weight file's keys."""
    modules = {}
    for key, shape in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if name.endswith(suffix):
                modules[name.removesuffix(suffix)] = tuple(shape)
    return modules


def _embeddings(config: dict, tensors: Mapping[str, tuple[int, ...]] | None) -> list[str]:
    """Adapted input embeddings and output heads: embedding LoRA tensors and lm_head, or their config names."""
    if tensors is not None:
        found = {key.removeprefix(PREFIX).rsplit(".", 1)[0] for key in tensors if ".lora_embedding_" in key}
        found |= {name for name in _lora_modules(tensors) if name.rsplit(".", 1)[-1] == "lm_head"}
        return sorted(found)
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return []
    return sorted(t for t in targets if t.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head"))


def _expert_lines(config: dict) -> list[str]:
    parameters = sorted(config.get("target_parameters") or [])
    if not parameters:
        return []
    kinds = sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in parameters})  # as a recipe names them
    by_module: dict[str, set[str]] = {}
    for name in parameters:
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        by_module.setdefault(owner, set()).add(leaf)
    half = sorted(owner for owner, leaves in by_module.items() if not {"gate_up_proj", "down_proj"} <= leaves)
    line = (
        f"target_parameters ({', '.join(kinds)}; {len(parameters)} expert parameter(s)): vLLM serves LoRA on fused "
        "experts only for MoE models whose vLLM class reads HF PEFT's 3-D expert layout (GPT-OSS, Qwen3.5-MoE, ...), "
        "with both experts.gate_up_proj and experts.down_proj adapted"
    )
    if half:
        line += f"; here {_named(half)} adapt(s) only one of the two, which vLLM's loader fails on"
    return [f"{line}; {MERGED}"]


def _scale_lines(config: dict, tensors: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Layers whose HF PEFT scale vLLM's or llama.cpp's single-alpha reading does not reproduce."""
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora"))
    if not r or alpha is None:
        return []
    experts = {name.rsplit(".", 1)[0] for name in config.get("target_parameters") or []}
    alphas = config.get("alpha_pattern") or {}
    vllm_off, llama_off = [], []
    for name, shape in sorted(_lora_modules(tensors).items()):
        if len(shape) != 2 or name.split(".base_layer")[0] in experts:
            continue
        rank = shape[0]
        meant = pattern_value(alphas, name, alpha) / (math.sqrt(rank) if rslora else rank)
        vllm = alpha / (math.sqrt(r) if rslora else r)
        llama = alpha / rank
        if not math.isclose(vllm, meant, rel_tol=1e-6):
            vllm_off.append((name, vllm / meant))
        if not math.isclose(llama, meant, rel_tol=1e-6):
            llama_off.append((name, llama / meant))
    lines = []
    if vllm_off:
        name, ratio = vllm_off[0]
        lines.append(
            f"{_named([n for n, _ in vllm_off])}: vLLM keeps r and lora_alpha only (rank_pattern and alpha_pattern "
            f"are dropped) and scales every layer by one lora_alpha / r, so these would run at another strength than "
            f"trained ({name}: {ratio:.3g}x); export with one rank and alpha, or {MERGED}"
        )
    if llama_off:
        name, ratio = llama_off[0]
        unread = [key for key in ("use_rslora", "rank_pattern", "alpha_pattern") if config.get(key)]
        why = f"{' and '.join(unread)} {'is' if len(unread) == 1 else 'are'}"
        lines.append(
            f"{_named([n for n, _ in llama_off])}: llama.cpp scales each layer by lora_alpha / its rank ({why} not "
            f"carried into GGUF), so these would run at another strength than trained ({name}: {ratio:.3g}x); "
            f"{MERGED_GGUF}"
        )
    return lines


def serving_warnings(config: dict, tensors: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """One line per part of an adapter (its adapter_config.json, and its weight file's tensor names and shapes
    when given) that vLLM or llama.cpp refuses, skips or scales otherwise than HF PEFT."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        return [
            f"{peft_type or 'this'} adapters load in HF PEFT, but vLLM and llama.cpp serve LoRA only; "
            f"convert with --format lora (or --format gguf-lora --rank R for llama.cpp), or {MERGED}"
        ]
    lines = []
    if config.get("modules_to_save"):
        saved = ", ".join(sorted(config["modules_to_save"]))
        lines.append(
            f"modules_to_save ({saved}): vLLM refuses adapters that carry whole modules, and llama.cpp drops norm "
            f"copies without a word (its converter refuses other modules); {MERGED}"
        )
    if config.get("use_dora"):
        lines.append(f"use_dora: vLLM refuses DoRA adapters and llama.cpp's converter stops on them; {MERGED}")
    if config.get("lora_bias"):
        lines.append(f"lora_bias: vLLM refuses adapters with a bias and llama.cpp's converter stops on it; {MERGED}")
    lines += _expert_lines(config)
    embeddings = _embeddings(config, tensors)
    if embeddings:
        lines.append(
            f"LoRA on {_named(embeddings)}: vLLM adapts embed_tokens and lm_head only on architectures that declare "
            "them (Llama, Qwen3, ...) and refuses the adapter on the others; llama.cpp's converter refuses lm_head "
            f"when the base ties it to the embedding; {MERGED}"
        )
    if tensors is not None:
        convs = sorted(name for name, shape in _lora_modules(tensors).items() if len(shape) > 2)
        if convs:
            lines.append(f"LoRA on convolutions ({_named(convs)}): vLLM has no LoRA layer for them; {MERGED}")
        lines += _scale_lines(config, tensors)
    return lines
