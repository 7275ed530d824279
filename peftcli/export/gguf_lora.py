"""`peft export RUN --format gguf-lora`: a LoRA adapter as the GGUF adapter file llama.cpp loads beside its base
(`llama-server -m base.gguf --lora adapter.gguf`), for a base that `peft export BASE --format gguf` writes.

What llama.cpp's loader (src/llama-adapter.cpp, llama_adapter_lora_init_impl) and graph (src/llama-graph.cpp)
expect, and how this module meets it:

- metadata: general.type "adapter", adapter.type "lora", general.architecture equal to the base GGUF's (the
  loader refuses another), adapter.lora.alpha (f32). Nothing else is read.
- tensors: one pair `<base tensor>.lora_a` / `<base tensor>.lora_b` per adapted weight, named after the base
  GGUF's tensor (blk.0.attn_q.weight.lora_a), from the same tensor name map the full export uses.
- shapes: for a linear layer lora_a is A (r x in) and lora_b is B (out x r) exactly as HF PEFT stores them (ggml
  lists dimensions the other way round: the loader checks a.ne[0] = in, b.ne[1] = out, a.ne[1] = b.ne[0] = r).
  For the token embedding llama.cpp gathers rows of lora_a by token id, so lora_a is lora_embedding_A
  transposed (vocab x r) and lora_b is lora_embedding_B (hidden x r).
- scale: llama.cpp multiplies B·A by alpha / r with one alpha per file and each pair's r (lora_b's rank
  dimension). The file's alpha is chosen so that alpha / r is our scale: the adapter's alpha for alpha / r
  scaling, alpha·sqrt(r) for rsLoRA's alpha / sqrt(r). Layers whose scale times rank differs from the file's
  (rsLoRA with rank_pattern, alpha_pattern) get the ratio multiplied into their lora_b.
- rope layout: the full export permutes the rows of q_proj/k_proj for llama.cpp's "llama" graph; an update
  B·A on those weights needs the same row permutation, which is a permutation of B's rows.

What the file cannot express is refused before anything is written: modules_to_save (whole modules), DoRA's
magnitudes, adapter biases, parameters adapted directly (fused experts), layers llama.cpp has no tensor for,
and an embedding or output-head LoRA on a model whose GGUF shares one tensor for both (llama.cpp would apply the
embedding's pair to the head too).

Before the file is published it is read back with gguf's reader: metadata, names, shapes and types as planned,
and every factor within the rounding of its storage type of the values computed from the adapter.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from peftcli.errors import AdapterError, PeftCliError, VerificationError
from peftcli.export.gguf import (
    _FILE_TYPE,
    GGUF_TYPES,
    _llama_cpp_arch,
    _storage_type,
    check_exportable,
    permute_rows,
    rope_permuted_heads,
    tensor_names,
    ties_embeddings,
)
from peftcli.train.safe_write import check_space, staged_file

DEFAULT_TYPE = "f32"  # adapters are small: exact by default, as llama.cpp's own converter
HF_PREFIX = "base_model.model."
# HF PEFT key suffix -> (which factor, whether it is an embedding's)
FACTOR_KEYS = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
F16_MAX = float(np.finfo(np.float16).max)
_QTYPE = gguf.GGMLQuantizationType
MERGED = "export the merged model instead (--format gguf)"


@dataclass
class _Pair:
    """One adapted weight: its HF module, the base GGUF tensor it applies to, and the factors as stored."""

    module: str
    target: str  # base tensor name, e.g. blk.0.attn_q.weight
    a: np.ndarray  # float32, in the file's orientation
    b: np.ndarray
    rank: int
    a_type: gguf.GGMLQuantizationType = _QTYPE.F32
    b_type: gguf.GGMLQuantizationType = _QTYPE.F32


@dataclass
class LoraGguf:
    """What `write_gguf_lora` wrote, for the CLI to print."""

    output: Path
    architecture: str
    alpha: float
    ranks: list[int]
    pairs: int
    quant: str
    verified: bool
    worst_ratio: float = 0.0  # largest |read back - computed| / bound over all factors (<= 1 passes)
    notes: list[str] = field(default_factory=list)


def check_type(quant: str) -> None:
    if quant not in GGUF_TYPES:
        raise PeftCliError(f"--quant: {quant!r} is not one of {', '.join(GGUF_TYPES)}")


def check_adapter(adapter_dir: Path) -> None:
    """Refuse, from adapter_config.json alone, a method or option llama.cpp's LoRA adapter cannot hold."""
    from peftcli.tuners.adapter import adapter_task, read_adapter_config

    method, params, raw = read_adapter_config(adapter_dir)
    convert = "pass --rank R or --energy E to convert its update to plain LoRA by SVD (as --format lora does)"
    if method != "lora":
        raise AdapterError(f"{adapter_dir}: llama.cpp loads LoRA adapters only, not {method}; {convert}, or {MERGED}")
    if params.dora:
        raise AdapterError(
            f"{adapter_dir}: DoRA's per-feature magnitudes have no place in llama.cpp's LoRA adapter; {convert}, "
            f"or {MERGED}"
        )
    saved = sorted(set(params.modules_to_save) | set(raw.get("modules_to_save") or []))
    if saved:
        raise AdapterError(
            f"{adapter_dir}: modules_to_save ({', '.join(saved)}) are whole trained modules, which llama.cpp's "
            f"LoRA adapter cannot carry; {MERGED}"
        )
    if params.target_parameters:
        raise AdapterError(f"{adapter_dir}: LoRA on parameters (target_parameters) has no llama.cpp form; {MERGED}")
    task = adapter_task(raw)
    if task != "causal_lm":
        raise AdapterError(f"{adapter_dir}: a {task} adapter; llama.cpp runs causal language models only")


def _base_config(section) -> dict:
    """The base model's config.json as a dict: from its directory, or from transformers for a GGUF or hub base."""
    import json

    from peftcli.models.load import is_gguf

    where = Path(section.name_or_path).expanduser()
    if (where / "config.json").is_file():
        return json.loads((where / "config.json").read_text(encoding="utf-8"))
    from transformers import AutoConfig

    try:
        if is_gguf(section.name_or_path):
            config = AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
        else:
            config = AutoConfig.from_pretrained(section.name_or_path)
    except (OSError, ValueError) as exc:
        raise PeftCliError(
            f"cannot read the base model's config ({section.name_or_path}): {str(exc).splitlines()[0]}; "
            "pass --base PATH"
        ) from None
    return config.to_dict()


def _gguf_base_names(section) -> set[str] | None:
    """The tensor names of a GGUF base file (what llama.cpp will look the pairs up in); None for other bases."""
    from peftcli.models.load import is_gguf

    if not is_gguf(section.name_or_path):
        return None
    return {t.name for t in gguf.GGUFReader(Path(section.name_or_path).expanduser()).tensors}


def _factors(tensors: dict, adapter_dir: Path) -> dict[str, dict]:
    """module -> {"a": tensor, "b": tensor, "embedding": bool}; any other tensor is refused."""
    modules: dict[str, dict] = {}
    other = []
    for key, value in tensors.items():
        name = key.removeprefix(HF_PREFIX)
        for suffix, (which, embedding) in FACTOR_KEYS.items():
            if name.endswith(suffix):
                entry = modules.setdefault(name.removesuffix(suffix), {"embedding": embedding})
                entry[which] = value
                break
        else:
            other.append(name)
    if other:
        kind = (
            "DoRA magnitudes" if any("lora_magnitude_vector" in n for n in other) else "tensors other than LoRA factors"
        )
        raise AdapterError(
            f"{adapter_dir}: the adapter holds {kind} ({', '.join(sorted(other)[:3])}"
            f"{' ...' if len(other) > 3 else ''}), which llama.cpp's LoRA adapter cannot carry; {MERGED}"
        )
    for module, entry in modules.items():
        if "a" not in entry or "b" not in entry:
            raise AdapterError(f"{adapter_dir}: {module} has only one of its LoRA factors; the adapter is incomplete")
    return modules


def plan_pairs(adapter_dir: Path, config: dict, gguf_names: set[str] | None = None) -> tuple[list[_Pair], float, list]:
    """Every (lora_a, lora_b) pair as it goes in the file (float32), the file's alpha, and notes."""
    from peftcli.tuners.adapter import read_adapter_config, read_adapter_weights
    from peftcli.tuners.lora.patterns import pattern_value

    _, params, _ = read_adapter_config(adapter_dir)
    modules = _factors(read_adapter_weights(adapter_dir), adapter_dir)
    names = tensor_names(config)
    tied = ties_embeddings(config) if gguf_names is None else "output.weight" not in gguf_names
    pairs, scales, unknown = [], {}, []
    for module, entry in sorted(modules.items()):
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or (gguf_names is not None and target not in gguf_names):
            unknown.append(module)
            continue
        if tied and target in ("token_embd.weight", "output.weight"):
            raise AdapterError(
                f"{module}: this model ties its output head to the token embedding, and llama.cpp then uses the one "
                "tensor token_embd.weight for both, so it would apply this LoRA to the other side too; "
                f"train without adapting {module.rsplit('.', 1)[-1]}, or {MERGED}"
            )
        a = entry["a"].float().numpy()
        b = entry["b"].float().numpy()
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterError(f"{module}: lora_A has rank {rank} but lora_B {b.shape[1]}; the adapter is damaged")
        if entry["embedding"]:
            a = a.T  # llama.cpp gathers rows of lora_a by token id (llm_graph_context::build_inp_embd)
        heads = rope_permuted_heads(config, target)
        if heads:
            b = permute_rows(b, heads)
        alpha = float(pattern_value(params.alpha_pattern, module, params.alpha))
        scales[module] = alpha / (math.sqrt(rank) if params.rslora else rank)
        pairs.append(_Pair(module, target, np.ascontiguousarray(a), np.ascontiguousarray(b), rank))
    if unknown:
        raise AdapterError(
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[_llama_cpp_arch(config)]} model has no tensor for the adapted "
            f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}; {MERGED}"
        )
    if not pairs:
        raise AdapterError(f"{adapter_dir}: the adapter has no LoRA factors")
    alpha, notes = _fold_scales(pairs, scales)
    return pairs, alpha, notes


def _fold_scales(pairs: list[_Pair], scales: dict[str, float]) -> tuple[float, list[str]]:
    """The file's alpha: llama.cpp scales each pair by alpha / r, so alpha = scale·r for the most common scale·r;
    other pairs take the ratio into lora_b (one float32 rounding)."""
    products = {pair.module: scales[pair.module] * pair.rank for pair in pairs}
    counts = Counter(products.values())
    alpha = max(counts, key=lambda value: (counts[value], value))
    folded = 0
    for pair in pairs:
        ratio = products[pair.module] / alpha
        if not math.isclose(ratio, 1.0, rel_tol=1e-12):
            pair.b = (pair.b * np.float32(ratio)).astype(np.float32)
            folded += 1
    notes = []
    if folded:
        notes.append(
            f"{folded} of {len(pairs)} layers have another scale·rank than alpha {alpha:g} (rsLoRA with rank_pattern, "
            "or alpha_pattern): their scale ratio was multiplied into lora_b, as llama.cpp has one alpha per file"
        )
    return alpha, notes


def _assign_types(pairs: list[_Pair], quant: str) -> None:
    for pair in pairs:
        pair.a_type = _storage_type(pair.a.shape, quant)
        pair.b_type = _storage_type(pair.b.shape, quant)
        for array, qtype, which in ((pair.a, pair.a_type, "a"), (pair.b, pair.b_type, "b")):
            if qtype == _QTYPE.F16 and np.abs(array).max(initial=0.0) > F16_MAX:
                raise PeftCliError(
                    f"{pair.module}: lora_{which} has values beyond f16's range ({np.abs(array).max():.3g}); "
                    "use --quant bf16 or f32"
                )


def _tensors(pairs: list[_Pair]):
    """(name, float32 array, storage type) of every tensor, in a fixed order."""
    for pair in pairs:
        yield f"{pair.target}.lora_a", pair.a, pair.a_type
        yield f"{pair.target}.lora_b", pair.b, pair.b_type


def write_gguf_lora(
    adapter_dir: str | Path,
    out_file: str | Path,
    quant: str = DEFAULT_TYPE,
    *,
    base: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    metadata_name: str | None = None,
) -> LoraGguf:
    """Write the LoRA adapter in `adapter_dir` as a llama.cpp GGUF adapter at `out_file`; see the module doc."""
    from peftcli.train.run_dir import model_section

    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    check_type(quant)
    if out_file.exists() and not overwrite:  # before the work; staged_file checks again at the end
        raise PeftCliError(f"{out_file} already exists; pass --overwrite to replace it, or choose another --output")
    check_adapter(adapter_dir)
    section = model_section(adapter_dir, base)
    config = _base_config(section)
    check_exportable(config, f"{adapter_dir} (base {section.name_or_path})")
    arch = gguf.MODEL_ARCH_NAMES[_llama_cpp_arch(config)]
    gguf_names = _gguf_base_names(section)
    if gguf_names is not None:
        base_arch = gguf.GGUFReader(Path(section.name_or_path).expanduser()).fields["general.architecture"]
        if base_arch.contents() != arch:
            raise PeftCliError(f"{section.name_or_path} is a {base_arch.contents()} GGUF, not {arch}")
    pairs, alpha, notes = plan_pairs(adapter_dir, config, gguf_names)
    _assign_types(pairs, quant)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(metadata_name or adapter_dir.resolve().name)
    writer.add_file_type(_FILE_TYPE[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, Path(section.name_or_path).name or section.name_or_path)
    sizes = []
    for name, array, qtype in _tensors(pairs):
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(array.shape, qtype))
        writer.add_tensor_info(name, array.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        sizes.append(nbytes)
    check_space(out_file, sum(sizes))

    result = LoraGguf(out_file, arch, alpha, sorted({p.rank for p in pairs}), len(pairs), quant, verify, notes=notes)
    with staged_file(out_file, overwrite) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, array, qtype in _tensors(pairs):
                writer.write_tensor_data(gguf.quants.quantize(array, qtype))
        finally:
            writer.close()
        if verify:
            result.worst_ratio = check_written(tmp, pairs, arch, alpha)
    return result


def rounding_bound(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Per element, the largest difference storing `array` (float32) as `qtype` may leave.

    F32: none. F16/BF16: half a unit in the last place of the value's binade (round to nearest; subnormals
    share the smallest normal binade's unit). Q8_0: each block of 32 stores round(x / d) with d = max|x| / 127
    kept as an f16, so half a step plus 127 times the rounding of d.
    """
    if qtype == _QTYPE.F32:
        return np.zeros_like(array)
    magnitude = np.abs(array)
    if qtype in (_QTYPE.F16, _QTYPE.BF16):
        min_exponent, mantissa = (-14, 10) if qtype == _QTYPE.F16 else (-126, 7)
        exponent = np.floor(np.log2(np.maximum(magnitude, np.float32(2.0**min_exponent))))
        return np.exp2(exponent - mantissa - 1).astype(np.float32)
    if qtype == _QTYPE.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        blocks = magnitude.reshape(-1, block)
        step = blocks.max(axis=1, keepdims=True) / 127
        d_rounding = rounding_bound(step, _QTYPE.F16)
        bound = step / 2 + 127 * d_rounding + 4 * np.finfo(np.float32).eps * blocks
        return np.broadcast_to(bound, blocks.shape).reshape(array.shape)
    raise NotImplementedError(qtype.name)


def check_written(path: Path, pairs: list[_Pair], arch: str, alpha: float) -> float:
    """Read the written file back: metadata, tensor names, shapes and types as planned, and every factor within
    its storage type's rounding of the computed values. Returns the worst difference as a share of its bound."""
    reader = gguf.GGUFReader(path)
    try:
        fields = {key: reader.fields[key].contents() for key in reader.fields if not key.startswith("GGUF.")}
        expected = {
            "general.type": "adapter",
            "general.architecture": arch,
            "adapter.type": "lora",
            "adapter.lora.alpha": float(np.float32(alpha)),
        }
        wrong = {key: fields.get(key) for key, value in expected.items() if fields.get(key) != value}
        if wrong:
            raise VerificationError(f"{path.name}: metadata read back differs from what was written: {wrong}")
        planned = {name: (array, qtype) for name, array, qtype in _tensors(pairs)}
        stored = {t.name: t for t in reader.tensors}
        if set(stored) != set(planned):
            raise VerificationError(
                f"{path.name}: read back {len(stored)} tensors, {len(planned)} were written "
                f"({sorted(set(stored) ^ set(planned))[:3]} differ)"
            )
        worst = 0.0
        for name, (array, qtype) in planned.items():
            tensor = stored[name]
            if tensor.tensor_type != qtype:
                raise VerificationError(
                    f"{path.name}: {name} was read back as {tensor.tensor_type.name}, not {qtype.name}"
                )
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            if values.shape != array.shape:
                raise VerificationError(
                    f"{path.name}: {name} was read back with shape {values.shape}, not {array.shape}"
                )
            difference = np.abs(values.astype(np.float32) - array)
            bound = rounding_bound(array, qtype)
            if not np.all(difference <= bound):
                at = np.unravel_index(np.argmax(difference - bound), array.shape)
                raise VerificationError(
                    f"{path.name}: {name} read back differs from the adapter's value by {difference[at]:.3g} at "
                    f"{tuple(int(i) for i in at)}, beyond {qtype.name}'s rounding ({bound[at]:.3g}); nothing was "
                    "written. Check the disk and export again"
                )
            ratios = np.divide(difference, bound, out=np.zeros_like(difference), where=bound > 0)
            worst = max(worst, float(ratios.max(initial=0.0)))
        return worst
    finally:
        del reader
