"""`peft merge`: fold a trained adapter into its base checkpoint, one safetensors shard at a time.

The model is never built in memory. Its architecture is built with zero-stride placeholder weights (a
tensor of any shape backed by one element), the adapter is applied and loaded onto that skeleton, and then
each base tensor is read from its shard, merged by the adapter layer that wraps it (the same `merge()` the
layers use in memory, so a merged checkpoint equals the unmerged model), cast and written. Peak memory is
about one output shard plus the adapter plus the layer being merged.

Output is written to a temporary sibling directory and renamed at the end: a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import AdapterError, ModelError, PeftCliError
from peftcli.export.base_checkpoint import BaseCheckpoint, base_shards, storage_quantization
from peftcli.export.safetensors_stream import OutputTensor, ShardSetWriter, split_into_shards
from peftcli.models.experts import checkpoint_rows
from peftcli.models.load import DTYPES, build_empty_model, is_gguf
from peftcli.recipe.schema import ModelSection
from peftcli.train.run_dir import TOKENIZER_FILES, label_names, model_section, trained_quantized
from peftcli.train.safe_write import check_space, staged_dir
from peftcli.tuners.adapter import (
    adapter_task,
    apply_adapter,
    load_adapter_tensors,
    merge_refusal,
    read_adapter_config,
    read_adapter_weights,
)
from peftcli.tuners.inject import unwrapped_name
from peftcli.tuners.protocol import AdapterContext, AdapterLayer
from peftcli.tuners.registry import get_tuner

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class MergeResult:
    """What `merge_adapter_dir` wrote, for the CLI to report."""

    output: Path
    method: str
    base: str
    dtype: str
    shards: int
    tensors: int
    merged_modules: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise PeftCliError(f"--max-shard-size: {text!r} is not a size (e.g. 2GB, 500MB, 1GiB)") from None


# --- the skeleton -----------------------------------------------------------------------------------------------


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of the same shape and dtype that owns a single element (every entry aliases it)."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def build_skeleton(section: ModelSection, label_names: list[str] | None) -> nn.Module:
    """The architecture with placeholder weights: real CPU tensors, so methods can build their layers on it.

    A weight several modules share (an output head tied to the input embedding) stays one parameter, so the
    methods and the merge see the pair as a pair.
    """
    model = build_empty_model(section, label_names=label_names)
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in placeholders:
                    placeholders[id(param)] = nn.Parameter(_placeholder(param), requires_grad=False)
                module._parameters[name] = placeholders[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = _placeholder(buffer)
    return model


# --- merging ----------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Where every checkpoint key of the base goes in the adapted skeleton."""

    wrapped: dict[str, nn.Module]  # checkpoint module prefix -> the adapter layer wrapping it
    owner_of: dict[str, str]  # checkpoint key -> wrapped prefix, for keys a layer merges
    replaced: dict[str, torch.Tensor]  # checkpoint key -> the adapter's value (trained in full)
    new_keys: list[str]  # trained tensors the base checkpoint does not have (a new classification head)
    # Tied pairs the adapter changes on one side: checkpoint key -> the other names that get their own copy
    aliases: dict[str, list[str]] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)  # every name of such a pair, for the report
    # Checkpoint keys holding rows of an adapted fused expert parameter -> (its adapter layer, the flat rows)
    expert_rows: dict[str, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)

    # Both are derived on first use, once the plan is complete (after _untie).
    @cached_property
    def parts_of(self) -> dict[str, list[str]]:
        """The checkpoint keys each wrapped layer merges (its weight, and bias if any)."""
        parts: dict[str, list[str]] = {owner: [] for owner in self.wrapped}
        for key, owner in self.owner_of.items():
            parts[owner].append(key)
        return parts

    @cached_property
    def stored_as(self) -> dict[str, str]:
        """Each tied copy -> the checkpoint key it is read from."""
        return {copy: stored for stored, copies in self.aliases.items() for copy in copies}


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Checkpoint names of each weight the base ties (an output head tied to the embedding).

    A pair is found by parameter identity and by the model's declared ties (`all_tied_weights_keys`), which
    still names a pair after `modules_to_save` gave the head its own copy.
    """
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(unwrapped_name(name))
    pairs = [names for names in by_id.values() if len(names) > 1]
    pairs += [[target, source] for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()]
    groups: list[list[str]] = []
    for pair in pairs:
        joined = [group for group in groups if set(group) & set(pair)]
        merged = sorted({name for group in joined for name in group} | set(pair))
        groups = [group for group in groups if group not in joined] + [merged]
    return groups


def _untie(plan: _Plan, model: nn.Module, keys: dict) -> dict:
    """Give each side of a tied pair the adapter changes its own tensor; returns the keys with the copies added.

    The checkpoint stores a tied pair once. If the adapter changes one side (LoRA on the input embedding, a
    trained copy of the head), the merged model needs both: the changed side merged, the other as in the base,
    and `tie_word_embeddings: false`, or loading it would tie the head to the merged embedding again.
    """
    out = dict(keys)
    for group in _tied_groups(model):
        if not any(name in plan.owner_of or name in plan.replaced for name in group):
            continue  # untouched: stays tied
        stored = [name for name in group if name in keys]
        if not stored:
            raise AdapterError(f"the base checkpoint stores none of the tied weights {', '.join(group)}")
        missing = [name for name in group if name not in keys]
        plan.aliases[stored[0]] = missing
        plan.untied.extend(group)
        for name in missing:
            out[name] = keys[stored[0]]
    return out


def _is_wrapper(module: nn.Module) -> bool:
    """An adapter layer the merge folds (see tuners/protocol.py: AdapterLayer)."""
    return isinstance(module, AdapterLayer)


def wrapper_chain(layer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The wrappers from `layer` down (several adapted parameters of one module nest) and the module they wrap."""
    chain = [layer]
    while _is_wrapper(chain[-1].base_layer):
        chain.append(chain[-1].base_layer)
    return chain, chain[-1].base_layer


def _plan(model: nn.Module, param_names: list[str]) -> _Plan:
    wrapped = {
        name: module
        for name, module in model.named_modules()
        if name and _is_wrapper(module) and "base_layer" not in name.split(".")  # the outermost of a nest
    }
    owner_of = {}
    base_params = set()
    for prefix, layer in wrapped.items():
        _, base = wrapper_chain(layer)
        for leaf, param in base.named_parameters(recurse=False):
            owner_of[f"{prefix}.{leaf}"] = prefix
            base_params.add(id(param))
    named = dict(model.named_parameters())
    replaced = {}
    for name in param_names:
        # Trained tensors are the adapter's own (merged by their layer) unless they are base tensors.
        if id(named[name]) in base_params or not any(name.startswith(p + ".") for p in wrapped):
            key = unwrapped_name(name)
            if key not in owner_of:
                replaced[key] = named[name].detach()
    return _Plan(wrapped, owner_of, replaced, new_keys=[])


def _split_experts(plan: _Plan, model: nn.Module, keys: dict) -> None:
    """Fused expert parameters (experts x rows x cols) that the checkpoint stores per expert (transformers 5
    splits them when it saves): each checkpoint tensor gets the update of exactly its rows, key by key, so the
    whole stack's update is never built."""
    shapes = {unwrapped_name(name): tuple(p.shape) for name, p in model.named_parameters()}
    for key in [k for k in plan.owner_of if k not in keys]:
        rows = checkpoint_rows(model, key, shapes[key])
        if rows is None:
            continue  # _check_fit names the missing key
        owner = plan.owner_of.pop(key)
        leaf = key.rsplit(".", 1)[1]
        chain, _ = wrapper_chain(plan.wrapped[owner])
        layer = next((w for w in chain if getattr(w, "parameter_name", None) == leaf), None)
        for stored, numbers in rows.items():
            want = (len(numbers), shapes[key][-1])
            if stored not in keys or tuple(keys[stored][0]) != want:
                found = "missing" if stored not in keys else f"shaped {tuple(keys[stored][0])}"
                raise AdapterError(f"the base checkpoint stores {key} per expert, but {stored} is {found} ({want})")
            if layer is not None:
                plan.expert_rows[stored] = (layer, numbers)


def _check_fit(plan: _Plan, model: nn.Module, keys: dict, base: str) -> None:
    """Every tensor the adapter merges into must be in the base checkpoint, with the skeleton's shape."""
    state = {unwrapped_name(name): p for name, p in model.named_parameters(remove_duplicate=False)}
    for key in plan.owner_of:
        if key not in keys:
            raise AdapterError(
                f"adapter does not fit base {base}: it adapts {key.rsplit('.', 1)[0]}, but the checkpoint has no {key}"
            )
        shape = tuple(state[key].shape)
        if key.endswith(".weight") and _stored_transposed(plan.wrapped[plan.owner_of[key]]):
            shape = shape[::-1]
        if shape != tuple(keys[key][0]):
            raise AdapterError(
                f"adapter does not fit base {base}: {key} is {tuple(keys[key][0])} in the checkpoint, the adapter was "
                f"trained on {shape}"
            )


def _output_tensor(key: str, source: MergeSource, out_dtype: torch.dtype) -> OutputTensor:
    """Where a tensor goes in the output: floats in the output dtype, others as they are."""
    dtype = source.plan.replaced[key].dtype if key in source.plan.replaced else source.keys[key][1]
    return OutputTensor(key, out_dtype if dtype.is_floating_point else dtype, source.shape(key))


def _open_writer(out_dir: Path, layout: list[OutputTensor], max_bytes: int) -> ShardSetWriter:
    """Shards named as transformers names them, and their index."""
    shards = split_into_shards(layout, max_bytes)
    count = len(shards)
    if count == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map = {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in layout)}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return ShardSetWriter(out_dir, names, shards)


def _stored_transposed(layer: nn.Module) -> bool:
    """A Conv1D wrapped as a linear layer: its checkpoint weight is the transpose of the layer's."""
    return bool(getattr(layer.base_layer, "stored_transposed", False))


def _merge_layer(layer: nn.Module, prefix: str, base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge one wrapped layer on its real base tensors; returns the merged tensors and frees them again."""
    chain, base = wrapper_chain(layer)
    params = dict(base.named_parameters(recurse=False))
    transposed = _stored_transposed(layer)
    for leaf, param in params.items():
        # In fp32 whatever the base's dtype, so the output dtype is the only rounding (merges may write in place)
        tensor = base_tensors[f"{prefix}.{leaf}"]
        tensor = tensor.t() if transposed and leaf == "weight" else tensor
        param.data = tensor.to(torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
    for wrapper in chain:
        # Each name of a tied pair is merged into a copy of its own (see _untie), so the partner is unaffected.
        sharers, wrapper.shares_weight_with = wrapper.shares_weight_with, ()
        wrapper.merge()
        wrapper.shares_weight_with = sharers
    merged = {
        f"{prefix}.{leaf}": param.data.t() if transposed and leaf == "weight" else param.data
        for leaf, param in params.items()
    }
    for wrapper in chain:
        wrapper.merged = False  # the placeholders go back; the layer is not reused
        wrapper.forget_unmerge_state()
    for param in params.values():
        param.data = _placeholder(param.data)
    return merged


def _add_rows(tensor: torch.Tensor, layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor holding some rows of an adapted fused parameter, with their update added (fp32)."""
    with torch.no_grad():
        return tensor.to(torch.float32, copy=True).add_(layer.delta_rows(rows))


def _copy_side_files(adapter_dir: Path, base_dir: Path | None, out: Path, config) -> None:
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        source = adapter_dir / name if (adapter_dir / name).is_file() else (base_dir / name if base_dir else None)
        if source is not None and source.is_file():
            shutil.copy2(source, out / name)
    if base_dir is not None and (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")


def _gguf_state(section: ModelSection, label_names) -> dict[str, torch.Tensor]:
    """A GGUF base, dequantized whole (GGUF files are read through transformers; they are small models)."""
    from peftcli.models.load import load_base_model

    model = load_base_model(section.model_copy(update={"dtype": "fp32"}), label_names=label_names)
    return {k: v.detach() for k, v in model.state_dict().items()}


@dataclass
class MergeSource:
    """A base checkpoint with a trained adapter folded in, tensor by tensor; no model is ever built.

    `stream` gives every output tensor in checkpoint order, reading each base file once front to back (what
    `peft merge` writes into safetensors shards); `read` gives any one tensor on its own (what the GGUF writer
    asks for, in its own order). Wrapped layers are merged on their real base tensors in fp32 by their own
    `merge()`; tensors trained in full come from the adapter.
    """

    method: str
    section: ModelSection
    skeleton: nn.Module
    plan: _Plan
    keys: dict[str, tuple[tuple[int, ...], torch.dtype]]  # every base tensor the output has, with tied copies
    base_dir: Path | None
    shards: list[Path]
    notes: list[str]
    checkpoint: BaseCheckpoint | None = None
    gguf_state: dict[str, torch.Tensor] | None = None
    merged_layers: int = 0
    _merged: dict[str, torch.Tensor] = field(default_factory=dict)  # a layer's merged leaves not yet read
    _expert_layers: set[int] = field(default_factory=set)  # expert adapters merged row-wise so far

    def output_keys(self) -> list[str]:
        """Every tensor of the merged model: the base's, then those only the adapter has (a new head)."""
        return [*self.keys, *self.plan.new_keys]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.plan.replaced:
            return tuple(self.plan.replaced[key].shape)
        return tuple(self.keys[key][0])

    def stream(self, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every output tensor, base files read once in order."""
        plan = self.plan
        waiting: dict[str, dict[str, torch.Tensor]] = {}  # a wrapped layer's tensors, until all have been read
        source = self.checkpoint.tensors(progress) if self.checkpoint is not None else iter(self.gguf_state.items())
        for stored_key, tensor in source:
            for key in (stored_key, *plan.aliases.get(stored_key, ())):
                if key in plan.expert_rows:
                    yield key, self._expert_rows(key, tensor)
                    continue
                owner = plan.owner_of.get(key)
                if owner is None:
                    yield key, plan.replaced.get(key, tensor)
                    continue
                group = waiting.setdefault(owner, {})
                group[key] = tensor
                if all(k in group for k in plan.parts_of[owner]):
                    yield from _merge_layer(plan.wrapped[owner], owner, waiting.pop(owner)).items()
                    self.merged_layers += 1
                del group
            del tensor
        for key in plan.new_keys:
            yield key, plan.replaced[key]
        if waiting:
            raise AdapterError(f"the base checkpoint lacks tensors of {', '.join(sorted(waiting))}")

    def read(self, key: str) -> torch.Tensor:
        """One output tensor on its own (a wrapped layer is merged when its first tensor is asked for)."""
        plan = self.plan
        if key in plan.expert_rows:
            return self._expert_rows(key, self.base(key))
        owner = plan.owner_of.get(key)
        if owner is None:
            return plan.replaced[key] if key in plan.replaced else self.base(key)
        if key not in self._merged:
            base = {k: self.base(k) for k in plan.parts_of[owner]}
            self._merged.update(_merge_layer(plan.wrapped[owner], owner, base))
            self.merged_layers += 1
        return self._merged.pop(key)

    def _expert_rows(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        layer, rows = self.plan.expert_rows[key]
        if id(layer) not in self._expert_layers:
            self._expert_layers.add(id(layer))
            self.merged_layers += 1
        return _add_rows(tensor, layer, rows)

    def base(self, key: str) -> torch.Tensor:
        """A tensor of the base checkpoint as stored (a tied copy read from the name it is stored under)."""
        stored = self.plan.stored_as.get(key, key)
        return self.checkpoint.read(stored) if self.checkpoint is not None else self.gguf_state[stored]

    def config(self, dtype: torch.dtype):
        """The merged model's transformers config: `dtype`, no quantization, the tie undone if it was."""
        config = self.skeleton.config
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = dtype
        if self.plan.untied:
            for part in {id(c): c for c in (config, config.get_text_config())}.values():
                part.tie_word_embeddings = False
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.use_cache = True
        return config

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


def open_merge(adapter_dir: str | Path, base: str | None = None, dtype: str = "bf16") -> MergeSource:
    """Check a run's adapter against its base and prepare to read the merged tensors (`dtype`: for the notes)."""
    adapter_dir = Path(adapter_dir)
    method, params, raw = read_adapter_config(adapter_dir)
    spec = get_tuner(method)
    if not spec.capabilities.mergeable:
        raise AdapterError(merge_refusal(method))
    adapter = read_adapter_weights(adapter_dir)
    section = model_section(adapter_dir, base)
    task = adapter_task(raw)
    if section.task != task:
        section = section.model_copy(update={"task": task})
    labels = label_names(adapter_dir)
    notes = []

    skeleton = build_skeleton(section, labels)
    info = apply_adapter(skeleton, params, AdapterContext(task=task))
    named = dict(skeleton.named_parameters())
    for name in info.param_names:  # trained tensors get real storage before the adapter is copied in
        named[name].data = torch.zeros(named[name].shape, dtype=named[name].dtype)
    for key in adapter:  # an adapter may carry a base tensor (a resized embedding): give it storage too
        target = key.removeprefix("base_model.model.")
        if ".base_layer." in target and target in named and named[target].data.stride() != named[target].stride():
            named[target].data = torch.zeros(named[target].shape, dtype=named[target].dtype)
    load_adapter_tensors(skeleton, adapter)
    plan = _plan(skeleton, info.param_names)
    del adapter  # its values now live in the skeleton

    checkpoint, gguf_state, base_dir, shards = None, None, None, []
    if is_gguf(section.name_or_path):
        gguf_state = _gguf_state(section, labels)
        keys = {k: (tuple(v.shape), v.dtype) for k, v in gguf_state.items()}
        notes.append(f"the GGUF base {Path(section.name_or_path).name} was dequantized to {dtype}")
    else:
        base_dir = Path(section.name_or_path)
        if not base_dir.is_dir():
            raise ModelError(
                f"model.name_or_path: {section.name_or_path} is not a local directory; the merge reads the base's "
                "safetensors files (download it and pass --base PATH)"
            )
        config_json = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        try:
            stored_as = storage_quantization(config_json)
        except ModelError as exc:
            raise ModelError(f"{base_dir}: {exc}") from None
        shards = base_shards(base_dir)
        checkpoint = BaseCheckpoint(shards)
        keys = checkpoint.shapes
        if stored_as:
            notes.append(
                f"the base is stored {stored_as}-quantized (bitsandbytes); its {checkpoint.quantized} quantized "
                f"weights were dequantized and the merged model is plain {dtype}"
            )
    keys = _untie(plan, skeleton, keys)
    _split_experts(plan, skeleton, keys)
    _check_fit(plan, skeleton, keys, section.name_or_path)
    if plan.untied:
        notes.append(
            f"the adapter changes one side of the tied weights {' / '.join(plan.untied)}: the merged model stores "
            "each side and sets tie_word_embeddings: false"
        )
    plan.new_keys = [k for k in plan.replaced if k not in keys]
    if trained_quantized(adapter_dir):
        notes.append("the run trained on a quantized base; its update is merged into the base's 16-bit weights")
    return MergeSource(method, section, skeleton, plan, keys, base_dir, shards, notes, checkpoint, gguf_state)


def merge_adapter_dir(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    base: str | None = None,
    dtype: str = "bf16",
    max_shard_size: str | None = None,
    overwrite: bool = False,
    progress=None,
    check=None,
) -> MergeResult:
    """Merge the adapter in `adapter_dir` into its base and write a Hugging Face model directory at `output`.

    `check`, if given, is called with the finished directory before it is put in place; an exception from it
    leaves nothing behind.
    """
    started = time.perf_counter()
    adapter_dir, output = Path(adapter_dir), Path(output)
    source = open_merge(adapter_dir, base, dtype)
    out_dtype = DTYPES[dtype]
    largest = max((p.stat().st_size for p in source.shards), default=0)
    limit = parse_size(max_shard_size) if max_shard_size else max(largest, 1 << 30)
    layout = [_output_tensor(key, source, out_dtype) for key in source.output_keys()]
    try:
        check_space(output, sum(t.nbytes for t in layout))
        with staged_dir(output, overwrite) as tmp:
            writer = _open_writer(tmp, layout, limit)
            for key, value in source.stream(progress):
                writer.write(key, value.to(out_dtype) if value.is_floating_point() else value)
            writer.close()
            _copy_side_files(adapter_dir, source.base_dir, tmp, source.config(out_dtype))
            if check is not None:
                check(tmp)
    finally:
        source.close()
    return MergeResult(
        output=output,
        method=source.method,
        base=source.section.name_or_path,
        dtype=dtype,
        shards=len(writer.files),
        tensors=len(layout),
        merged_modules=source.merged_layers,
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - started,
        notes=source.notes,
    )
