"""Write a llama-family Hugging Face model directory as one GGUF file that llama.cpp runs.

The weights are read one tensor at a time from safetensors and written straight into the file, so memory stays
near one tensor (in float32) whatever the model size; nothing is loaded through transformers except the tokenizer,
whose behaviour (does it add a BOS token?) is the ground truth the file must reproduce.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from peftcli.errors import PeftCliError
from peftcli.export.gguf_tokenizer import add_tokenizer
from peftcli.export.gguf_verify import GGUFCheck, verify_gguf
from peftcli.train.safe_write import check_space, staged_file

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# Both use llama.cpp's "llama" architecture: same tensors, same maths.
# HF architecture -> llama.cpp architecture. Llama and Mistral share llama.cpp's "llama" graph, whose rope
# rotates adjacent pairs, so their q/k rows are permuted; Qwen2 and Qwen3 rotate halves (NeoX style) as HF
# does, so theirs are written as they are. Qwen2 has q/k/v biases, Qwen3 q/k norms: the tensor maps know both.
LLAMA_CPP_ARCH = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "GemmaForCausalLM": gguf.MODEL_ARCH.GEMMA,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
}
# Gemma: RMS norms scale by (1 + weight), stored here as weight + 1 as llama.cpp expects; the embedding is
# scaled by sqrt(width) and the activation is tanh-approximated GELU inside llama.cpp's graphs, as in HF.
GEMMA_ARCHS = (gguf.MODEL_ARCH.GEMMA, gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
SUPPORTED_ARCHITECTURES = tuple(LLAMA_CPP_ARCH)
# A config.json may name only its model_type (no `architectures` list).
ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# HF rope types llama.cpp reproduces exactly for the llama architecture. "dynamic" has no llama.cpp counterpart;
# yarn/longrope differ in details (attention factor, per-dim factors) that are not checked here, so they are refused.
ROPE_TYPES = ("default", "linear", "llama3")

_QTYPE = gguf.GGMLQuantizationType
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_MATRIX_TYPE = {"f32": _QTYPE.F32, "f16": _QTYPE.F16, "bf16": _QTYPE.BF16, "q8_0": _QTYPE.Q8_0}


@dataclass
class _Tensor:
    """One tensor of the output: where it comes from, its GGUF name, shape (HF order) and storage type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: str | None = None  # HF tensor name; None for tensors computed here (rope_freqs)
    heads: int = 0  # > 0: permute rows for llama.cpp's rope layout (q_proj, k_proj)
    shift: float = 0.0  # added to every value (Gemma's norms: HF stores w, llama.cpp wants 1 + w)
    data: np.ndarray | None = None  # computed tensors


def write_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    quant: str = "f16",
    *,
    metadata_name: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    on_verified: Callable[[GGUFCheck], None] | None = None,
) -> Path:
    """Export `model_dir` (config.json, safetensors, tokenizer.json) to the GGUF file `out_file`; return its path.

    quant: f32, f16, bf16 or q8_0 for the matrices. As in llama.cpp's own converter, 1-D tensors (norms) always
    stay f32, and with q8_0 a matrix whose rows are not a multiple of the Q8_0 block size (32) is stored as f16.
    The file is written under a temporary name in the same directory and renamed at the end, so a failed export
    leaves nothing behind; an existing `out_file` is replaced only with `overwrite`. With `verify` the file is
    read back before that rename (peftcli.export.gguf_verify) and `on_verified` gets the result; a difference
    beyond rounding raises VerificationError and publishes nothing.
    """
    from peftcli.export.base_checkpoint import BaseCheckpoint

    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    checkpoint = BaseCheckpoint(_weight_files(model_dir))
    try:
        shapes = {name: shape for name, (shape, _) in checkpoint.shapes.items()}
        name = metadata_name or model_dir.resolve().name
        check = _write(shapes, checkpoint.read, config, model_dir, Path(out_file), quant, name, overwrite, verify)
    finally:
        checkpoint.close()
    if check and on_verified:
        on_verified(check)
    return Path(out_file)


def write_gguf_from_run(
    run_dir: str | Path,
    out_file: str | Path,
    quant: str = "f16",
    *,
    base: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    on_verified: Callable[[GGUFCheck], None] | None = None,
) -> tuple[Path, list[str]]:
    """Merge a run's adapter into its base straight into a GGUF file; returns the file and the merge's notes.

    Each merged tensor goes from the merge to the quantizer to the file, in fp32 one at a time: no merged
    copy of the model is staged anywhere, so memory stays near the largest tensor. `verify` and `on_verified`
    as for write_gguf: the file is compared with the merged tensors, merged again one at a time.
    """
    import torch

    from peftcli.export.merge import open_merge
    from peftcli.train.run_dir import model_section

    run_dir = Path(run_dir)
    section = model_section(run_dir, base)
    where = f"{run_dir} (base {section.name_or_path})"
    config_file = Path(section.name_or_path).expanduser() / "config.json"
    config = None
    if config_file.is_file():  # checked before the adapter is even loaded; a GGUF base after, on its config
        config = json.loads(config_file.read_text(encoding="utf-8"))
        check_exportable(config, where)
    source = open_merge(run_dir, base, "fp32")
    try:
        if config is None:
            config = source.config(torch.float32).to_dict()
            check_exportable(config, where)
        if source.plan.untied:
            config["tie_word_embeddings"] = False
        shapes = {key: source.shape(key) for key in source.output_keys()}
        tokenizer_dir = run_dir if (run_dir / "tokenizer.json").is_file() else source.base_dir
        name = run_dir.resolve().name
        check = _write(shapes, source.read, config, tokenizer_dir, Path(out_file), quant, name, overwrite, verify)
    finally:
        source.close()
    if check and on_verified:
        on_verified(check)
    return Path(out_file), source.notes


def _write(
    shapes,
    read,
    config: dict,
    tokenizer_dir: Path,
    out_file: Path,
    quant: str,
    name: str,
    overwrite: bool,
    verify: bool,
) -> GGUFCheck | None:
    """The GGUF file from tensor shapes (HF names) and `read(name)`, one tensor in memory at a time; with
    `verify`, read back and compared with `read` before it is published."""
    if quant not in GGUF_TYPES:
        raise PeftCliError(f"unknown gguf type {quant!r}; choose one of {', '.join(GGUF_TYPES)}")
    if out_file.exists() and not overwrite:  # before the work; staged_file checks again at the end
        raise PeftCliError(f"{out_file} already exists; pass --overwrite to replace it")
    tensors, n_vocab = _plan_tensors(shapes, config, quant, str(tokenizer_dir))

    sizes = [math.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype)) for t in tensors]
    check_space(out_file, sum(sizes))
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_llama_cpp_arch(config)])
    _add_hparams(writer, config, name, n_vocab, quant)
    add_tokenizer(writer, tokenizer_dir, n_vocab)
    for t, nbytes in zip(tensors, sizes, strict=True):
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)

    with staged_file(out_file, overwrite) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(_encode(_permuted(_source(t, read), t), t))
        finally:
            writer.close()
        if verify:
            expected = _expected_metadata(config, n_vocab)
            return verify_gguf(tmp, tensors, lambda t: _source(t, read), expected, n_vocab)
    return None


def _expected_metadata(config: dict, n_vocab: int) -> dict[str, object]:
    """What llama.cpp sizes the model by, as the file must state it."""
    arch = gguf.MODEL_ARCH_NAMES[_llama_cpp_arch(config)]
    keys = gguf.Keys.LLM, gguf.Keys.Attention
    heads = config["num_attention_heads"]
    return {
        gguf.Keys.General.ARCHITECTURE: arch,
        keys[0].BLOCK_COUNT.format(arch=arch): config["num_hidden_layers"],
        keys[0].EMBEDDING_LENGTH.format(arch=arch): config["hidden_size"],
        keys[0].FEED_FORWARD_LENGTH.format(arch=arch): config["intermediate_size"],
        keys[0].CONTEXT_LENGTH.format(arch=arch): _context_length(config),
        keys[0].VOCAB_SIZE.format(arch=arch): n_vocab,
        keys[1].HEAD_COUNT.format(arch=arch): heads,
        keys[1].HEAD_COUNT_KV.format(arch=arch): config.get("num_key_value_heads") or heads,
    }


def _read_config(model_dir: Path) -> dict:
    """config.json, checked for an architecture and options this exporter reproduces."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise PeftCliError(f"{model_dir} has no config.json; gguf export needs a full model directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    check_exportable(config, str(model_dir))
    return config


def check_exportable(config: dict, where: str) -> None:
    """Refuse a config this exporter cannot reproduce in llama.cpp, naming `where` (the user's run or model).

    Called on the base's config before an adapter is merged, so a refusal costs nothing.
    """
    arch = _architecture(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        shown = arch or f"model_type {config.get('model_type', 'unknown')!r}"
        raise PeftCliError(
            f"{where}: gguf export supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {shown}; "
            "export --format safetensors instead and convert with llama.cpp's own converter"
        )
    if _llama_cpp_arch(config) in GEMMA_ARCHS:
        _check_gemma(config, where)
        return
    # llama.cpp's graphs for these have no such biases (Qwen2's q/k/v biases are its own) and use SiLU;
    # refuse rather than export wrong maths.
    for option in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(option):
            raise PeftCliError(f"{where}: gguf export does not handle {option}=true")
    if config.get("hidden_act", "silu") != "silu":
        raise PeftCliError(f"{where}: gguf export needs hidden_act silu, not {config['hidden_act']}")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise PeftCliError(f"{where}: gguf export handles rope types {', '.join(ROPE_TYPES)}, not {rope_type!r}")


def _gemma_layer_types(config: dict) -> list[str]:
    """Which layers use the sliding window, as llama.cpp lays them out: Gemma 2 every other one starting with
    the first, Gemma 3 five of every six."""
    every = 2 if _llama_cpp_arch(config) == gguf.MODEL_ARCH.GEMMA2 else 6
    return [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(config["num_hidden_layers"])
    ]


def _check_gemma(config: dict, where: str) -> None:
    """What llama.cpp's Gemma graphs fix, checked against the config (a difference would give another model)."""
    arch = _llama_cpp_arch(config)
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise PeftCliError(f"{where}: gguf export of Gemma needs hidden_activation gelu_pytorch_tanh, not {activation}")
    for option in ("attention_bias", "use_bidirectional_attention"):
        if config.get(option):
            raise PeftCliError(f"{where}: gguf export does not handle {option}=true")
    if arch == gguf.MODEL_ARCH.GEMMA:
        return
    # llama.cpp scales queries by 1/sqrt(head_dim) (HF: query_pre_attn_scalar ** -0.5)
    if config.get("query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        raise PeftCliError(
            f"{where}: gguf export of Gemma needs query_pre_attn_scalar equal to head_dim ({_head_dim(config)}), "
            f"as llama.cpp scales queries; this model has {config['query_pre_attn_scalar']}"
        )
    layer_types = config.get("layer_types") or _gemma_layer_types(config)
    if layer_types != _gemma_layer_types(config):
        raise PeftCliError(
            f"{where}: gguf export of {arch.name.lower()} needs llama.cpp's sliding-window layout "
            "(Gemma 2: every other layer, Gemma 3: five of six); this model's layer_types differ"
        )
    for kind in ("full_attention", "sliding_attention"):
        rope = _rope(config, kind)
        if rope["rope_type"] not in (("default", "linear") if kind == "full_attention" else ("default",)):
            raise PeftCliError(f"{where}: gguf export does not handle rope type {rope['rope_type']!r} for {kind}")
    if arch == gguf.MODEL_ARCH.GEMMA3 and _rope(config, "sliding_attention")["rope_theta"] != 10000.0:
        raise PeftCliError(f"{where}: llama.cpp's Gemma 3 rotates sliding-window layers with base 10000")


def _rope(config: dict, layer_type: str = "full_attention") -> dict:
    """Rope settings as one dict: transformers 5 keeps them in rope_parameters (per layer type for Gemma 3),
    older configs in rope_scaling."""
    rope = dict(config.get("rope_scaling") or {})
    parameters = config.get("rope_parameters") or {}
    rope.update(parameters.get(layer_type, parameters) if isinstance(parameters.get(layer_type), dict) else parameters)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _architecture(config: dict) -> str | None:
    return (config.get("architectures") or [None])[0] or ARCHITECTURE_BY_MODEL_TYPE.get(config.get("model_type"))


def _llama_cpp_arch(config: dict) -> gguf.MODEL_ARCH:
    return LLAMA_CPP_ARCH[_architecture(config)]


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _context_length(config: dict) -> int:
    # Mistral's sliding window only differs from full attention beyond the window, so advertising the window as
    # the trained context keeps llama.cpp (which has no sliding window for this architecture) exact by default.
    # Qwen2/Qwen3 configs name a window but turn it off (use_sliding_window: false; true is refused).
    length = config["max_position_embeddings"]
    if _llama_cpp_arch(config) in GEMMA_ARCHS:
        return length  # llama.cpp keeps Gemma's sliding-window layers (see _add_gemma_hparams)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return min(length, window) if window else length


def _add_hparams(writer: gguf.GGUFWriter, config: dict, name: str, n_vocab: int, quant: str) -> None:
    heads, head_dim = config["num_attention_heads"], _head_dim(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    # Always stated, so no reader has to derive it from the width (Qwen3's is not width / heads).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if _llama_cpp_arch(config) in GEMMA_ARCHS:
        _add_gemma_hparams(writer, config)


def _add_gemma_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in _gemma_layer_types(config)])
    if _llama_cpp_arch(config) == gguf.MODEL_ARCH.GEMMA3:
        writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention")["rope_theta"]))


def _llama3_rope_factors(config: dict) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, stored as llama.cpp's rope_freqs tensor.

    llama3 scaling keeps high frequencies, divides low ones by `factor` and blends in between by wavelength;
    llama.cpp applies the same thing as theta / rope_freqs[i], so the tensor holds original / scaled frequency.
    """
    rope, dim = _rope(config), _head_dim(config)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    blend = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)  # 0: divide by factor, 1: keep
    scaled = freqs / factor * (1 - blend) + freqs * blend
    return (freqs / scaled).astype(np.float32)


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a single-file or sharded checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({model_dir / file for file in weight_map.values()})
    if not (model_dir / "model.safetensors").is_file():
        raise PeftCliError(
            f"{model_dir} has no safetensors weights (model.safetensors or model.safetensors.index.json)"
        )
    return [model_dir / "model.safetensors"]


def _plan_tensors(shapes: dict, config: dict, quant: str, where: str) -> tuple[list[_Tensor], int]:
    """Every output tensor with name, shape and type, from the HF tensor shapes; also the vocab size."""
    arch = _llama_cpp_arch(config)
    names = tensor_names(config)
    gemma = arch in GEMMA_ARCHS
    tied = ties_embeddings(config)
    if gemma and not tied and "lm_head.weight" in shapes and arch != gguf.MODEL_ARCH.GEMMA3:
        raise PeftCliError(
            f"{where}: llama.cpp's {arch.name.lower()} always uses the input embedding as the output head, but this "
            "model has its own lm_head (an adapter on embed_tokens or lm_head unties them); export --format "
            "safetensors, or train without adapting them"
        )
    tensors, unknown = [], []
    for source, shape in shapes.items():
        if source.endswith("rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
            continue  # recomputed by llama.cpp / shared with token_embd (llama.cpp falls back to it)
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(source)
            continue
        permute = rope_permuted_heads(config, name)
        shift = 1.0 if gemma and source.endswith("norm.weight") else 0.0
        tensors.append(_Tensor(name, tuple(shape), _storage_type(shape, quant), source, permute, shift))
    if unknown:
        raise PeftCliError(f"gguf export does not know where these tensors go: {', '.join(sorted(unknown)[:5])}")
    by_name = {t.name: t for t in tensors}
    if "token_embd.weight" not in by_name:
        raise PeftCliError(f"{where} has no token embedding (model.embed_tokens.weight)")
    if not tied and "output.weight" not in by_name:
        raise PeftCliError(f"{where} has no lm_head.weight and does not tie it to the embedding")
    if _rope(config)["rope_type"] == "llama3":
        factors = _llama3_rope_factors(config)
        tensors.append(_Tensor("rope_freqs.weight", factors.shape, _QTYPE.F32, data=factors))
    # A fixed order makes the file independent of how the checkpoint was sharded.
    tensors.sort(key=lambda t: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t.name)])
    return tensors, by_name["token_embd.weight"].shape[0]


def _storage_type(shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return _QTYPE.F32  # norms are tiny and sensitive; llama.cpp keeps them f32 in every file type
    qtype = _MATRIX_TYPE[quant]
    if qtype == _QTYPE.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return _QTYPE.F16  # Q8_0 blocks run along rows; a row that does not split into blocks cannot use it
    return qtype


def _source(t: _Tensor, read) -> np.ndarray:
    """One tensor's values as float32, in HF's layout: what the file must hold up to rounding and row order."""
    if t.data is not None:
        return t.data
    import torch

    array = read(t.source).to(torch.float32).numpy()
    if t.shift:
        array = array + np.float32(t.shift)
    return array


def _permuted(array: np.ndarray, t: _Tensor) -> np.ndarray:
    """`array` in the row order llama.cpp wants: q_proj and k_proj rows interleaved, others as they are."""
    if t.heads:
        array = permute_rows(array, t.heads)
    return np.ascontiguousarray(array)


def permute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """The rows (output features) of a q_proj/k_proj weight, or of a LoRA B on one, in llama.cpp's rope order.

    HF rotates the two halves of each head against each other; llama.cpp rotates adjacent pairs. Interleaving
    the halves row-wise makes the two agree (transformers undoes this on GGUF load). A row permutation P of the
    weight is one of any update B·A added to it, P(W + B·A) = PW + (PB)·A, so an adapter's B takes the same one.
    """
    rows = array.shape[0]
    return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def tensor_names(config: dict) -> gguf.TensorNameMap:
    """HF tensor (or module) name -> llama.cpp tensor name, for this model's architecture and depth."""
    return gguf.get_tensor_name_map(_llama_cpp_arch(config), config["num_hidden_layers"])


def ties_embeddings(config: dict) -> bool:
    """Whether the GGUF has no output.weight (llama.cpp then reuses token_embd); Gemma configs tie by default."""
    return config.get("tie_word_embeddings", _llama_cpp_arch(config) in GEMMA_ARCHS)


def rope_permuted_heads(config: dict, gguf_name: str) -> int:
    """The head count whose rows `permute_rows` reorders for the GGUF tensor `gguf_name` (0: written as is).

    Only llama.cpp's "llama" graph rotates adjacent pairs; Qwen2/Qwen3/Gemma rotate halves as HF does.
    """
    if _llama_cpp_arch(config) != gguf.MODEL_ARCH.LLAMA or not gguf_name.endswith(".weight"):
        return 0
    heads = config["num_attention_heads"]
    if ".attn_q." in gguf_name:
        return heads
    return config.get("num_key_value_heads") or heads if ".attn_k." in gguf_name else 0


def _encode(array: np.ndarray, t: _Tensor) -> np.ndarray:
    return gguf.quants.quantize(array, t.qtype)
