"""Safetensors files read and written one tensor at a time, with plain file reads and writes.

`safetensors.safe_open` memory-maps the file: every tensor read stays in the process's resident set until the
handle closes, so reading a 2 GB shard costs 2 GB of RSS. The merge reads each tensor into its own buffer
with `readinto` instead, and writes output shards whose header is known in advance (every output tensor's
name, dtype and shape come from the base's headers), so a tensor is written the moment it is ready and
nothing is buffered. The format is the documented one: an 8-byte little-endian header length, a JSON header
of `{name: {dtype, shape, data_offsets}}` padded to 8 bytes, then the tensor bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcli.errors import ModelError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's dtype, shape and place in the file, and the file's metadata."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ModelError(f"{path}: not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ModelError(f"{path}: tensor {name} has dtype {entry['dtype']}, which the merge cannot read")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + begin, end - begin)
    return tensors, metadata


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardReader:
    """Reads whole tensors of one safetensors file into fresh, owned CPU tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the context manager)

    def names(self) -> list[str]:
        """Tensor names in file order, so the file is read front to back."""
        return sorted(self.tensors, key=lambda name: self.tensors[name].start)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        self._file.seek(info.start)
        if info.nbytes and self._file.readinto(_bytes_of(tensor)) != info.nbytes:
            raise ModelError(f"{self.path}: file ends inside tensor {name}; the checkpoint is truncated")
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def split_into_shards(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [shard for shard in shards if shard]


class ShardSetWriter:
    """Writes a set of safetensors shards whose layout is fixed up front; tensors may arrive in any order.

    Each file's header is written when the writer opens; `write` puts a tensor's bytes at its place. `close`
    checks that every tensor was written (a file with a hole would read back garbage).
    """

    def __init__(self, directory: Path, names: list[str], shards: list[list[OutputTensor]]):
        self.where: dict[str, tuple[int, OutputTensor, int]] = {}
        self.files = []
        self.total_bytes = 0
        for index, (name, shard) in enumerate(zip(names, shards, strict=True)):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for tensor in shard:
                header[tensor.name] = {
                    "dtype": DTYPE_NAMES[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + tensor.nbytes],
                }
                offset += tensor.nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            handle = open(directory / name, "wb")  # noqa: SIM115 (closed in close())
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(8 + len(text) + offset)
            self.files.append(handle)
            start = 8 + len(text)
            for tensor in shard:
                self.where[tensor.name] = (index, tensor, start)
                start += tensor.nbytes
            self.total_bytes += offset
        self.written: set[str] = set()

    def write(self, name: str, value: torch.Tensor) -> None:
        index, expected, start = self.where[name]
        if value.dtype != expected.dtype or tuple(value.shape) != expected.shape:
            planned, got = (expected.dtype, expected.shape), (value.dtype, tuple(value.shape))
            raise RuntimeError(f"{name}: planned {planned}, got {got}")
        handle = self.files[index]
        handle.seek(start)
        handle.write(_bytes_of(value.contiguous()))
        self.written.add(name)

    def close(self) -> None:
        for handle in self.files:
            handle.close()
        missing = set(self.where) - self.written
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}")
