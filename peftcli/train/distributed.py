"""What the loop needs to know about the engine accelerate runs it on: DDP, DeepSpeed ZeRO or FSDP2.

The engine is chosen by the launcher (a preset from `peftcli/launch/presets/`, through the environment that
`accelerate launch` sets); these helpers adapt the loop to it: accumulation and clipping that DeepSpeed
must own, gloo between CPU processes, and whole adapter tensors gathered before they are saved.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from peftcli.launch.presets import Engine


def starts_from_base_weights(method) -> bool:
    """Whether the method reads whole base weights while it is applied (PiSSA/OLoRA inits, for instance)."""
    from peftcli.tuners.registry import get_tuner

    check = get_tuner(method.name).starts_from_base_weights
    return bool(check and check(method))


def engine_options(training, whole_base: bool = False) -> dict:
    """Extra `Accelerator` arguments for the engine the environment asks for.

    whole_base: under ZeRO-3, load the base whole in every process and partition it when prepared, instead of
    building it already partitioned (zero.Init, each process holding only its share from the start).
    """
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    options: dict = {}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU processes talk over gloo; DeepSpeed would otherwise pick a backend the CPU build lacks
        options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _silence_deepspeed_collective_deprecations()
        # DeepSpeed runs accumulation and clipping inside its engine: it must hear the recipe's values.
        steps = training.gradient_accumulation
        # ZeRO-3 builds the base partitioned (zero.Init), so no process ever holds all of it, unless the
        # method must start from whole base weights (then see whole_weights).
        options["deepspeed_plugin"] = DeepSpeedPlugin(
            gradient_accumulation_steps=steps,
            gradient_clipping=training.max_grad_norm or 0.0,
            zero3_init_flag=not whole_base,
        )
        options["gradient_accumulation_plugin"] = GradientAccumulationPlugin(
            num_steps=steps, sync_with_dataloader=False
        )
    return options


def _silence_deepspeed_collective_deprecations() -> None:
    """ZeRO-3 calls torch collectives that torch has deprecated; torch then warns from every process. The call is
    DeepSpeed's, nothing a user can act on, so the run's output leaves it out."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def unwrap_model(accelerator, model):
    """The model inside the engine's wrapper (DDP, DeepSpeed's engine, torch.compile).

    accelerate's own `unwrap_model` imports DeepSpeed whenever it is installed: 2 s, and DeepSpeed's "Setting
    accelerator to CPU" warning on every CPU run although the recipe does not use it. Only a DeepSpeed run
    asks accelerate; FSDP2 swaps the module's class in place and leaves nothing to unwrap.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def fsdp_between_cpu_processes(accelerator) -> None:
    """Run FSDP2 between CPU processes when the launcher asked for FSDP.

    accelerate selects FSDP only for GPU processes and quietly runs DDP between CPU processes instead,
    although PyTorch's fully_shard works on CPU over gloo. So that an fsdp2 recipe behaves the same on a
    laptop as on a GPU cluster (and its code paths are testable without GPUs), the engine the environment
    asked for is set on accelerate's state here, before anything is prepared.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the environment `accelerate launch` set from the preset
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both shared states: each new AcceleratorState() copies PartialState's values over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def check_processes_joined(accelerator) -> None:
    """Refuse to train alone in a process the launcher started as one of several.

    Under an external `accelerate launch` on a machine without GPUs and without ACCELERATE_USE_CPU,
    accelerate picks no distributed engine: each process would train on its share of the data with nothing
    keeping the copies of the model in step, and the main process would save its own copy.
    """
    from accelerate.utils import DistributedType

    from peftcli.errors import PeftCliError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.NO):
        raise PeftCliError(
            f"this process was started as one of {world}, but accelerate set it up to run alone; on a machine "
            "without GPUs set ACCELERATE_USE_CPU=true for the launcher, or start with peft train --launch"
        )


def describe_engine(accelerator) -> Engine:
    """The engine this accelerator ended up with."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        config = plugin.deepspeed_config.get("zero_optimization", {})
        devices = [str((config.get(key) or {}).get("device", "none")) for key in ("offload_optimizer", "offload_param")]
        offload = any(device != "none" for device in devices)
        return Engine("deepspeed", int(plugin.zero_stage), offload)
    if kind == DistributedType.FSDP:
        return Engine("fsdp")
    return Engine("ddp")


def gathered(model, engine: Engine):
    """A context in which ZeRO-3's partitioned trainable parameters are whole on every process."""
    if engine.kind != "deepspeed" or engine.zero_stage != 3:
        return nullcontext()
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_state_dict(accelerator, model, engine: Engine) -> dict | None:
    """FSDP2: the whole state dict, gathered on the main process (every process must call this)."""
    if engine.kind != "fsdp":
        return None
    return accelerator.get_state_dict(model)


@contextmanager
def whole_weights(accelerator, engine: Engine, whole_base: bool):
    """Load and adapt the base with whole weights under ZeRO-3 when the method needs them (`whole_base`).

    accelerate registers its DeepSpeed config with transformers, whose from_pretrained then builds ZeRO-3
    models already partitioned (zero.Init): the memory-lean path, taken by default. A method that starts from
    base weights (PiSSA/OLoRA) would read empty tensors there; for it each process holds the whole base
    until `prepare` partitions it.
    """
    if not whole_base or engine.kind != "deepspeed" or engine.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
