"""Resumable checkpoints through `accelerator.save_state`, holding only the adapter's weights.

accelerate would save the whole model (base included) each time; the pre-hooks below swap the model's
weights for the adapter's tensors on save and load them back ourselves on resume, with strict key checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftcli.errors import AdapterError
from peftcli.tuners.adapter import adapter_info
from peftcli.tuners.registry import load_implementation

TRAINER_STATE = "trainer_state.json"
METHOD_STATE = "method_state.safetensors"  # a method's own training state (AdaLoRA's importance estimates)


def _model_file(output_dir: str, index: int) -> Path:
    return Path(output_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def install_adapter_only_hooks(accelerator) -> None:
    """Make save_state/load_state carry the adapter's tensors instead of the full model."""

    def save_hook(models, weights, output_dir):
        for index, model in enumerate(models):
            if index >= len(weights):
                continue  # engines that save their own state (DeepSpeed, FSDP) leave no entry
            unwrapped = accelerator.unwrap_model(model)
            named = dict(unwrapped.named_parameters())
            info = adapter_info(unwrapped)
            weights[index] = {n: named[n].detach().cpu().contiguous() for n in info.param_names}
            method_state = getattr(load_implementation(info.method), "training_state", None)
            if method_state is not None and index == 0:
                tensors = {k: v.contiguous() for k, v in method_state(unwrapped).items()}
                save_file(tensors, str(Path(output_dir) / METHOD_STATE))

    def load_hook(models, input_dir):
        for index, model in enumerate(models):
            unwrapped = accelerator.unwrap_model(model)
            tensors = load_file(str(_model_file(input_dir, index)))
            expected = adapter_info(unwrapped).param_names
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise AdapterError(f"{input_dir}: checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]})")
            named = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for name in expected:
                    named[name].copy_(tensors[name].to(named[name].device, named[name].dtype))
            restore = getattr(load_implementation(adapter_info(unwrapped).method), "load_training_state", None)
            state_file = Path(input_dir) / METHOD_STATE
            if restore is not None and index == 0 and state_file.is_file():
                restore(unwrapped, load_file(str(state_file)))
        models.clear()  # loaded: accelerate must not load a (partial) state dict on top

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_trainer_state(checkpoint_dir: Path, state: dict) -> None:
    """The loop's own counters; written last, so its presence marks a complete checkpoint."""
    (checkpoint_dir / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def read_trainer_state(checkpoint_dir: Path) -> dict:
    """Counters of a checkpoint."""
    return json.loads((checkpoint_dir / TRAINER_STATE).read_text(encoding="utf-8"))
