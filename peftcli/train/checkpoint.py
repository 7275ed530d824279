"""Resumable checkpoints through `accelerator.save_state`, holding only the adapter's weights.

accelerate would save the whole model (base included) each time; the pre-hooks below swap the model's
weights for the adapter's tensors on save and load them back ourselves on resume, with strict key checks.
Under FSDP2 accelerate writes the model itself (sharded, through torch.distributed.checkpoint), so there
`fsdp_adapter_checkpoints` has it write and read the trainable tensors only.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftcli.errors import AdapterError
from peftcli.train.distributed import unwrap_model
from peftcli.tuners.adapter import adapter_info

METHOD_STATE = "method_state.safetensors"  # a method's own training state (AdaLoRA's importance estimates)


def _model_file(output_dir: str, index: int) -> Path:
    return Path(output_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def install_adapter_only_hooks(accelerator) -> None:
    """Make save_state/load_state carry the adapter's tensors instead of the full model."""

    def save_hook(models, weights, output_dir):
        for index, model in enumerate(models):
            if index >= len(weights):
                continue  # engines that save their own state (DeepSpeed, FSDP) leave no entry
            unwrapped = unwrap_model(accelerator, model)
            named = dict(unwrapped.named_parameters())
            info = adapter_info(unwrapped)
            weights[index] = {n: named[n].detach().cpu().contiguous() for n in info.param_names}
            method_state = info.implementation.training_state(unwrapped, info.params)
            if method_state and index == 0:
                tensors = {k: v.contiguous() for k, v in method_state.items()}
                save_file(tensors, str(Path(output_dir) / METHOD_STATE))

    def load_hook(models, input_dir):
        for index, model in enumerate(models):
            unwrapped = unwrap_model(accelerator, model)
            tensors = load_file(str(_model_file(input_dir, index)))
            expected = adapter_info(unwrapped).param_names
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise AdapterError(f"{input_dir}: checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]})")
            named = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for name in expected:
                    named[name].copy_(tensors[name].to(named[name].device, named[name].dtype))
            info = adapter_info(unwrapped)
            state_file = Path(input_dir) / METHOD_STATE
            if index == 0 and state_file.is_file():
                info.implementation.load_training_state(unwrapped, info.params, load_file(str(state_file)))
        models.clear()  # loaded: accelerate must not load a (partial) state dict on top

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


FSDP_ADAPTER_DIR = "adapter_fsdp"  # the adapter's shards, one file per process, in a checkpoint


@contextmanager
def fsdp_adapter_checkpoints(sharded_by_fsdp: bool):
    """While active, accelerate's save_state/load_state keep FSDP2 checkpoints to the trainable tensors.

    accelerate saves an FSDP model whole (each process its shard of every weight, the frozen base too: a
    checkpoint the size of the model). Its model save and load functions are swapped, for the duration of
    the call, for ones that pass torch's `ignore_frozen_params`; the optimizer, random and sampler states
    are still accelerate's.
    """
    if not sharded_by_fsdp:
        yield
        return
    import accelerate.accelerator as accelerator_module

    original = accelerator_module.save_fsdp_model, accelerator_module.load_fsdp_model
    accelerator_module.save_fsdp_model, accelerator_module.load_fsdp_model = _save_fsdp_adapter, _load_fsdp_adapter
    try:
        yield
    finally:
        accelerator_module.save_fsdp_model, accelerator_module.load_fsdp_model = original


def _fsdp_adapter_dir(directory, model_index: int) -> Path:
    return Path(directory) / (FSDP_ADAPTER_DIR if model_index == 0 else f"{FSDP_ADAPTER_DIR}_{model_index}")


def _save_fsdp_adapter(fsdp_plugin, accelerator, model, output_dir, model_index=0, **_):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tensors = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": tensors}, checkpoint_id=_fsdp_adapter_dir(output_dir, model_index))


def _load_fsdp_adapter(fsdp_plugin, accelerator, model, input_dir, model_index=0, **_):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    directory = _fsdp_adapter_dir(input_dir, model_index)
    if not directory.is_dir():
        raise AdapterError(f"{input_dir}: no {directory.name}/ in this checkpoint (was it written by FSDP2?)")
    options = StateDictOptions(ignore_frozen_params=True)
    tensors = get_model_state_dict(model, options=options)  # the shapes and shards to read into
    dcp.load({"model": tensors}, checkpoint_id=directory)
    set_model_state_dict(model, tensors, options=StateDictOptions(ignore_frozen_params=True, strict=False))
