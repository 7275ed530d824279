"""The accelerate launch presets (`peftcli/launch/presets/*.yaml`, copied to `configs/accelerate/`) and what
each one does to a run. Torch-free: recipe validation reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

PRESETS = ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2")


@dataclass(frozen=True)
class Engine:
    """What a preset (or a user's accelerate config file) asks accelerate for."""

    kind: str  # "ddp" | "deepspeed" | "fsdp"
    zero_stage: int | None = None
    offload: bool = False

    @property
    def shards_parameters(self) -> bool:
        """Whether a process holds only a slice of each parameter (ZeRO-3, FSDP)."""
        return self.kind == "fsdp" or self.zero_stage == 3

    def describe(self, world: int | None = None) -> str:
        """The engine's name; `world=1` without DeepSpeed or FSDP is plain single-process training, not DDP."""
        if self.kind == "ddp" and world == 1:
            return "single process"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}" + (" with CPU offload" if self.offload else "")
        return "FSDP2" if self.kind == "fsdp" else "DDP"


def preset_file(name_or_path: str) -> Path:
    """The accelerate config file for a preset name, or the given path of a user's own file."""
    if name_or_path in PRESETS:
        return Path(str(resources.files("peftcli.launch") / "presets" / f"{name_or_path}.yaml"))
    return Path(name_or_path).expanduser()


def read_engine(name_or_path: str) -> Engine:
    """The engine a preset or accelerate config file selects; ValueError with the reason when it cannot be used."""
    path = preset_file(name_or_path)
    if name_or_path not in PRESETS and not path.is_file():
        raise ValueError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an accelerate config file that exists"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({exc.__class__.__name__})") from None
    kind = str(config.get("distributed_type", "NO")).upper()
    has_deepspeed = bool(config.get("deepspeed_config")) or kind == "DEEPSPEED"
    has_fsdp = bool(config.get("fsdp_config")) or kind == "FSDP"
    if has_deepspeed and has_fsdp:
        raise ValueError(f"{path} asks for both FSDP and DeepSpeed; they are two ways of sharding, pick one")
    if has_deepspeed:
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            raise ValueError(
                f"{path}: deepspeed_config_file is not supported; set zero_stage and offload_* in the accelerate "
                "config, and accumulation and clipping in the recipe"
            )
        offload = any(str(ds.get(k, "none")).lower() not in ("none", "") for k in ("offload_optimizer_device",
                                                                                   "offload_param_device"))  # fmt: skip
        return Engine("deepspeed", int(ds.get("zero_stage", 2)), offload)
    if has_fsdp:
        version = int((config.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != 2:
            raise ValueError(f"{path}: FSDP version {version}; peftcli trains with FSDP2 (fsdp_version: 2)")
        return Engine("fsdp")
    return Engine("ddp")
