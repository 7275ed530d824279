"""`--verify` for GGUF: read the written file back with gguf's own reader and compare it with what was planned.

The metadata llama.cpp sizes the model by and the tensor set must be exactly as planned; every tensor,
dequantized and with the q/k row interleaving undone, must be within what its storage type's rounding allows of
the fp32 weights it was written from. Tensors are read and compared one at a time, in row chunks read from the
file (not through the reader's memory map, whose pages would all count as resident), so memory stays near one
source tensor, as when writing.

Bounds, per element x of the fp32 source (round to nearest throughout, as numpy and gguf's quantizers do):

- F32: stored as it is; the difference must be 0.
- F16: 11 significant bits, so rounding moves x by at most half an ulp of its binade, 2**(e - 11) for
  2**e <= |x| < 2**(e + 1) (rounding up to 2**(e + 1) is on that binade's grid too); below 2**-14 (subnormal)
  the spacing is 2**-24, so at most 2**-25. Nothing is clamped: a value at or beyond 65520 becomes inf and fails.
- BF16: 8 significant bits and float32's exponent range: 2**(e - 8), and 2**-134 below 2**-126.
- Q8_0: each block of 32 values of a row is stored as int8 q times one f16 scale s, from d = max|x| / 127 and
  q = round(x / d). So |q d - x| <= d / 2, and |q| <= 127 times the scale's own f16 rounding
  |s - d| <= max(2**-11 d, 2**-25) adds at most 127 |s - d|. The float32 roundings (of 1 / d, x * (1 / d) and
  q * s, each 2**-24 relative, on values up to 127 or max|x|) add under 2**-22 max|x|. The bound is taken from
  the source values only, never from the stored scale, so a damaged scale cannot widen it.

Every bound is a proven upper limit, with no allowance for anything else: a right file is always within it and
a file that differs by more is wrong.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from peftcli.errors import VerificationError

_QTYPE = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 20  # per comparison step: a few MB of temporaries whatever the tensor's size
F16_MAX = 65504.0


@dataclass(frozen=True)
class TensorCheck:
    """How far one tensor read back is from its source: at the element whose error is largest for its bound."""

    name: str
    qtype: str
    error: float
    bound: float
    ratio: float  # error / bound there (0 where both are 0)


@dataclass(frozen=True)
class GGUFCheck:
    """The result of reading a GGUF file back: how many tensors were compared, and the one nearest its bound."""

    tensors: int
    worst: TensorCheck


class _Reader(gguf.GGUFReader):
    """gguf's reader over a plain array view of its memory map: the same parsing, without np.memmap's per-slice
    Python overhead (SmolLM2's 49k tokens and merges: 1.2 s instead of 5)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)


def verify_gguf(
    path: Path,
    planned: Sequence,
    reference: Callable[[object], np.ndarray],
    metadata: dict[str, object],
    n_vocab: int,
) -> GGUFCheck:
    """Read `path` back and compare it with the plan; raise VerificationError on any difference.

    planned: the tensors written, each with name, shape (HF order), qtype and heads (> 0: rows interleaved for
    llama.cpp's rope). reference(t): the fp32 values t was written from, in HF row order. metadata: key -> value
    expected in the file; n_vocab: the number of tokens it must list.
    """
    try:
        reader = _Reader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise VerificationError(f"verify: the file cannot be read back ({exc}); {_NOTHING_WRITTEN}") from None
    _check_metadata(reader, metadata, n_vocab)
    stored = {t.name: t for t in reader.tensors}
    names = [t.name for t in planned]
    missing, extra = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
    if missing or extra or len(stored) != len(reader.tensors):
        raise VerificationError(
            f"verify: the file's tensors are not the planned ones (missing: {', '.join(missing) or 'none'}; "
            f"not planned: {', '.join(extra) or 'none'}); {_NOTHING_WRITTEN}"
        )
    worst = None
    with path.open("rb") as file:
        for t in planned:
            check = _check_tensor(file.fileno(), stored[t.name], t, reference(t))
            if worst is None or check.ratio > worst.ratio:
                worst = check
    return GGUFCheck(len(planned), worst)


_NOTHING_WRITTEN = "nothing was written. Check the disk and export again, or report this with the model's config.json"


def _check_metadata(reader: gguf.GGUFReader, expected: dict[str, object], n_vocab: int) -> None:
    wrong = []
    for key, value in expected.items():
        field = reader.fields.get(key)
        found = field.contents() if field is not None else None
        if found != value:
            wrong.append(f"{key} is {found!r}, not {value!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    count = len(tokens.data) if tokens is not None else 0
    if count != n_vocab:
        wrong.append(f"tokenizer.ggml.tokens lists {count} tokens, not {n_vocab}")
    if wrong:
        raise VerificationError(f"verify: {'; '.join(wrong)}; {_NOTHING_WRITTEN}")


def _check_tensor(fd: int, stored, planned, source: np.ndarray) -> TensorCheck:
    """Compare one tensor read back with its fp32 source, row chunk by row chunk."""
    name, qtype, shape = planned.name, planned.qtype, tuple(planned.shape)
    found_shape = tuple(int(n) for n in reversed(stored.shape.tolist()))  # GGUF lists dimensions innermost first
    nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
    if stored.tensor_type != qtype or found_shape != shape or tuple(source.shape) != shape or stored.n_bytes != nbytes:
        raise VerificationError(
            f"verify: {name} is stored as {stored.tensor_type.name} {list(found_shape)}, planned as "
            f"{qtype.name} {list(shape)} (source {list(source.shape)}); {_NOTHING_WRITTEN}"
        )
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    row_bytes = nbytes // rows
    source = source.reshape(rows, cols)
    order = _source_rows(rows, planned.heads) if planned.heads else None
    step = max(1, CHUNK_ELEMENTS // cols)
    worst = None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        raw = os.pread(fd, (stop - start) * row_bytes, int(stored.data_offset) + start * row_bytes)
        if len(raw) != (stop - start) * row_bytes:
            raise VerificationError(f"verify: the file ends inside {name}; {_NOTHING_WRITTEN}")
        data = np.frombuffer(raw, dtype=np.uint8).reshape(stop - start, row_bytes)
        read = gguf.quants.dequantize(data, qtype).reshape(stop - start, cols)
        want = source[start:stop] if order is None else source[order[start:stop]]
        check = _compare(name, qtype, read, want)
        if worst is None or check.ratio > worst.ratio:
            worst = check
    return worst


def _source_rows(rows: int, heads: int) -> np.ndarray:
    """For each row of a q/k tensor as stored, the HF row it holds.

    HF rotates the first half of each head's rows against the second; llama.cpp rotates adjacent pairs, so the
    file interleaves the halves: stored row 2j + k of a head is HF row k * half + j of that head.
    """
    half = rows // heads // 2
    stored = np.arange(rows)
    head, within = np.divmod(stored, 2 * half)
    j, k = np.divmod(within, 2)
    return head * 2 * half + k * half + j


def _bound(want: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The largest difference rounding to `qtype` can leave at each element (see the module docstring)."""
    size = np.abs(want)
    if qtype == _QTYPE.F32:
        return np.zeros_like(want)
    if qtype == _QTYPE.F16:
        return _half_ulp(size, bits=11, smallest_normal=2**-14)
    if qtype == _QTYPE.BF16:
        return _half_ulp(size, bits=8, smallest_normal=2**-126)
    if qtype == _QTYPE.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        blocks = size.reshape(want.shape[0], -1, block)
        largest = blocks.max(axis=-1, keepdims=True)
        d = largest / np.float32(127)  # the scale, computed as the quantizer does
        scale_rounding = np.maximum(d * np.float32(2**-11), np.float32(2**-25))
        per_block = d / 2 + 127 * scale_rounding + largest * np.float32(2**-22)
        return np.broadcast_to(per_block, blocks.shape).reshape(want.shape)
    raise VerificationError(f"verify: no bound is known for {qtype.name}")


def _half_ulp(size: np.ndarray, bits: int, smallest_normal: float) -> np.ndarray:
    """Half the spacing of a float type with `bits` significant bits around each |x| in `size` (all powers of
    two, so exact in float32)."""
    _, exponent = np.frexp(size)  # |x| = m * 2**exponent, 0.5 <= m < 1: the binade is 2**(exponent - 1)
    subnormal = np.float32(smallest_normal * 2.0**-bits)  # half the subnormal spacing 2**(1 - bits) * smallest
    return np.where(size >= smallest_normal, np.ldexp(np.float32(1), exponent - 1 - bits), subnormal)


def _compare(name: str, qtype, read: np.ndarray, want: np.ndarray) -> TensorCheck:
    """The element of `read` with the largest error relative to its bound; VerificationError beyond it."""
    bound = _bound(want, qtype)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(read - want)
        beyond = ~(error <= bound)  # NaN counts as beyond
        if beyond.any():
            same = (read == want) | (np.isnan(read) & np.isnan(want))  # an inf or NaN copied as it is
            error[same] = 0
            beyond &= ~same
        if beyond.any():
            at = np.unravel_index(np.argmax(np.where(beyond, np.nan_to_num(error, nan=np.inf), -1)), error.shape)
            raise VerificationError(_beyond_message(name, qtype, float(error[at]), float(bound[at]), want))
        ratio = np.divide(error, bound, out=np.zeros_like(error), where=bound > 0)
    at = np.unravel_index(np.argmax(ratio), ratio.shape)
    return TensorCheck(name, qtype.name, float(error[at]), float(bound[at]), float(ratio[at]))


def _beyond_message(name: str, qtype, error: float, bound: float, want: np.ndarray) -> str:
    hint = ""
    if qtype in (_QTYPE.F16, _QTYPE.Q8_0) and np.abs(want).max() > (F16_MAX if qtype == _QTYPE.F16 else 127 * F16_MAX):
        hint = f" (it has values beyond what {qtype.name} can hold; export --quant bf16 or f32)"
    return (
        f"verify: {name} read back from the file differs from the weights it was written from by {error:.3g}, "
        f"beyond the {bound:.3g} that {qtype.name} rounding allows{hint}; {_NOTHING_WRITTEN}"
    )
