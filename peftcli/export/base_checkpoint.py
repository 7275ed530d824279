"""The base model's safetensors checkpoint as the merge sees it: logical tensors, streamed in file order.

A plain checkpoint's tensors are passed through. A checkpoint stored quantized by bitsandbytes (what
`save_pretrained` writes for a model loaded in 4 or 8 bits) keeps each quantized weight as several tensors:
the packed weight plus its quantization state. Those are gathered and dequantized to one float32 tensor
under the weight's own name, so the rest of the merge never sees the difference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from peftcli.errors import ModelError
from peftcli.export.safetensors_stream import ShardReader, read_header

INDEX_NAME = "model.safetensors.index.json"

# What bitsandbytes stores beside a 4-bit weight `X.weight` (as `X.weight.<suffix>`).
FOUR_BIT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
FOUR_BIT_PACKED = "quant_state.bitsandbytes__"
# And beside an 8-bit weight `X.weight`: the row scales `X.SCB` and a layout tag `X.weight_format`.
EIGHT_BIT_SCALES, EIGHT_BIT_FORMAT = "SCB", "weight_format"


def base_shards(base_dir: Path) -> list[Path]:
    """The base's safetensors files, in index order; a clear error when there are none."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [base_dir / name for name in dict.fromkeys(weight_map.values())]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(
        f"{base_dir}: no model.safetensors or {INDEX_NAME}; the streaming merge reads safetensors checkpoints "
        "(convert .bin weights with transformers' save_pretrained first)"
    )


def storage_quantization(config_json: dict) -> str | None:
    """'nf4', 'fp4' or 'int8' for a checkpoint stored by bitsandbytes; None for a plain one; refuses others."""
    quant = config_json.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "unknown")
    if method != "bitsandbytes":
        raise ModelError(
            f"the base checkpoint is stored {method}-quantized; the merge can dequantize bitsandbytes checkpoints "
            "only: merge into the original 16-bit checkpoint instead (--base PATH)"
        )
    if quant.get("load_in_4bit") or quant.get("_load_in_4bit"):
        return quant.get("bnb_4bit_quant_type", "nf4")
    return "int8"


class BaseCheckpoint:
    """Logical tensor names, dtypes and shapes of a checkpoint, and its tensors one at a time."""

    def __init__(self, shards: list[Path]):
        self.shards = shards
        self.headers = {shard: read_header(shard)[0] for shard in shards}
        self.located = located = {name: shard for shard, header in self.headers.items() for name in header}
        self._readers: dict[Path, ShardReader] = {}
        self.parts: dict[str, dict[str, tuple[Path, str]]] = {}  # logical name -> {role: (shard, stored name)}
        self.kind: dict[str, str] = {}  # logical name -> "4bit" | "8bit", for quantized weights
        owned = set()
        for name in located:
            if FOUR_BIT_PACKED in name:
                weight = name.split("." + FOUR_BIT_PACKED)[0]
                roles = {"weight": weight, "packed": name}
                roles |= {s: f"{weight}.{s}" for s in FOUR_BIT_STATE if f"{weight}.{s}" in located}
                self.kind[weight] = "4bit"
            elif name.endswith("." + EIGHT_BIT_SCALES):
                prefix = name.removesuffix("." + EIGHT_BIT_SCALES)
                weight = f"{prefix}.weight"
                roles = {"weight": weight, "scales": name}
                if f"{prefix}.{EIGHT_BIT_FORMAT}" in located:
                    roles["format"] = f"{prefix}.{EIGHT_BIT_FORMAT}"
                self.kind[weight] = "8bit"
            else:
                continue
            if weight not in located:
                raise ModelError(f"{located[name]}: quantization state {name} has no weight {weight}")
            self.parts[weight] = {role: (located[stored], stored) for role, stored in roles.items()}
            owned.update(roles.values())
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for header in self.headers.values():
            for name, info in sorted(header.items(), key=lambda item: item[1].start):  # the order they are read
                if name in self.kind:
                    self.shapes[name] = (self._logical_shape(name), torch.float32)
                elif name not in owned:
                    self.shapes[name] = (info.shape, info.dtype)

    @property
    def quantized(self) -> int:
        return len(self.kind)

    def _logical_shape(self, weight: str) -> tuple[int, ...]:
        if self.kind[weight] == "8bit":
            shard, stored = self.parts[weight]["weight"]
            return self.headers[shard][stored].shape
        shard, stored = self.parts[weight]["packed"]
        with ShardReader(shard) as reader:
            return tuple(_unpack_json(reader.read(stored))["shape"])

    def tensors(self, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(logical name, tensor) for every tensor, shard by shard in file order; quantized weights dequantized
        as soon as all their parts have been read. `progress(done, total)` is called after each shard."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        role_of = {
            stored: (weight, role) for weight, roles in self.parts.items() for role, (_, stored) in roles.items()
        }
        for index, shard in enumerate(self.shards):
            if index and progress is not None:
                progress(index, len(self.shards))
            with ShardReader(shard) as reader:
                for name in reader.names():
                    if name not in role_of:
                        yield name, reader.read(name)
                        continue
                    weight, role = role_of[name]
                    group = pending.setdefault(weight, {})
                    group[role] = reader.read(name)
                    if len(group) == len(self.parts[weight]):
                        yield weight, self._dequantize(weight, pending.pop(weight))
        if progress is not None:
            progress(len(self.shards), len(self.shards))
        if pending:
            raise ModelError(f"the checkpoint lacks parts of the quantized weights {', '.join(sorted(pending))}")

    def read(self, name: str) -> torch.Tensor:
        """One logical tensor on its own (dequantized if stored quantized), in any order; `close` when done."""
        if name in self.parts:
            parts = {role: self._read_stored(shard, stored) for role, (shard, stored) in self.parts[name].items()}
            return self._dequantize(name, parts)
        if name not in self.located:
            raise KeyError(name)
        return self._read_stored(self.located[name], name)

    def _read_stored(self, shard: Path, name: str) -> torch.Tensor:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(shard)
        return self._readers[shard].read(name)

    def close(self) -> None:
        """Close the files `read` opened."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _dequantize(self, weight: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind[weight] == "8bit":
            # LLM.int8 stores W as round(127 * W / rowmax) with the row maxima in SCB.
            return parts["weight"].float() * (parts["scales"].float().unsqueeze(1) / 127.0)
        import bitsandbytes.functional as bnb_functional

        state = {role: value for role, value in parts.items() if role not in ("weight", "packed")}
        state.update(_unpack_json(parts["packed"]))
        quant_state = bnb_functional.QuantState.from_dict(state, device=torch.device("cpu"))
        return bnb_functional.dequantize_4bit(parts["weight"], quant_state).float()


def _unpack_json(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.numpy()).decode("utf-8"))
