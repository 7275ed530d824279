"""VeRA on nn.Linear: y = W x + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x)))), A and B shared.

The shared projections live once in the model, in a `VeraProjections` module registered on the root as
non-persistent buffers: they move with the model, are never trainable, and stay out of the base model's
state dict. On disk they are HF PEFT's `base_model.vera_A` / `base_model.vera_B` (with save_projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.errors import AdapterError
from peftcli.tuners.hf_format import HF_KEY_PREFIX
from peftcli.tuners.inject import AdditiveLinear, find_targets, replace_module
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.vera.spec import SPEC, VeraParams

PROJECTIONS_ATTR = "vera_projections"
# Where HF PEFT keeps the shared projections in its state dict (model level, adapter name stripped).
HF_PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


def kaiming_uniform_seeded(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) drawn from `generator` on the CPU, as HF PEFT does."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random projections every VeRA layer slices: A (r x max in), B (max out x r)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Drawn A first, then B, from one generator: the order HF PEFT uses, so the same key gives the same pair.
        vera_a = kaiming_uniform_seeded((r, max_in), generator)
        vera_b = kaiming_uniform_seeded((max_out, r), generator)
        self.register_buffer("vera_A", vera_a.to(device), persistent=False)
        self.register_buffer("vera_B", vera_b.to(device), persistent=False)


class VeraLinear(AdditiveLinear):
    """A frozen linear layer plus VeRA's two trainable vectors; the projections are shared, not owned."""

    def __init__(self, base_layer: nn.Linear, projections: VeraProjections, r: int, d_initial: float, dropout: float):
        super().__init__(base_layer)
        device = base_layer.weight.device
        # A plain list keeps the shared module out of this layer's children (it is registered once, on the root).
        self._shared = [projections]
        self.vera_lambda_b = nn.Parameter(torch.zeros(base_layer.out_features, device=device, dtype=torch.float32))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=torch.float32))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced_projections(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared A (r x in) and B (out x r), on `device`."""
        shared = self._shared[0]
        return shared.vera_A[:, : self.in_features].to(device), shared.vera_B[: self.out_features, :].to(device)

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, in fp32."""
        sliced_a, sliced_b = self.sliced_projections(self.vera_lambda_d.device)
        return (self.vera_lambda_b.unsqueeze(-1) * sliced_b) @ (self.vera_lambda_d.unsqueeze(-1) * sliced_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        sliced_a, sliced_b = self.sliced_projections(x.device)
        hidden = F.linear(self.vera_dropout(x.to(self.vera_lambda_d.dtype)), sliced_a)
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * hidden, sliced_b)
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.vera_lambda_d.shape[0]}"


def apply_method(model: nn.Module, params: VeraParams, context: AdapterContext) -> AppliedMethod:
    """Draw the shared projections (sized for the largest targeted layer) and wrap every target in a VeraLinear."""
    if hasattr(model, PROJECTIONS_ATTR):
        raise AdapterError("this model already carries VeRA projections; peftcli keeps one adapter per model")
    targets = find_targets(model, params.target_modules, params.exclude_modules, SPEC.capabilities.layer_types, "vera")
    layers = [model.get_submodule(name) for name in targets]
    max_in = max(layer.in_features for layer in layers)
    max_out = max(layer.out_features for layer in layers)
    device = layers[0].weight.device
    projections = VeraProjections(params.r, max_in, max_out, params.projection_prng_key, device)
    model.add_module(PROJECTIONS_ATTR, projections)
    for name, layer in zip(targets, layers, strict=True):
        replace_module(model, name, VeraLinear(layer, projections, params.r, params.d_initial, params.dropout))
    return AppliedMethod(targets)


def _projections(model: nn.Module) -> VeraProjections:
    return getattr(model, PROJECTIONS_ATTR)


def adapter_tensors(model: nn.Module, params: VeraParams, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer vectors under their usual keys, plus the shared projections under HF PEFT's model-level keys."""
    tensors = {HF_KEY_PREFIX + name: tensor for name, tensor in named.items()}
    if params.save_projection:
        shared = _projections(model)
        for attr, key in HF_PROJECTION_KEYS.items():
            tensors[key] = getattr(shared, attr).detach().to("cpu").contiguous()
    return tensors


def load_tensors(model: nn.Module, params: VeraParams, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy saved projections into the shared buffers; return the rest under parameter names."""
    shared = _projections(model)
    present = [key for key in HF_PROJECTION_KEYS.values() if key in tensors]
    if params.save_projection and len(present) < len(HF_PROJECTION_KEYS):
        raise AdapterError(
            "adapter does not fit: its config says save_projection: true but the file lacks "
            f"{', '.join(sorted(set(HF_PROJECTION_KEYS.values()) - set(present)))}"
        )
    # Projections in the file win even with save_projection: false: they are what the adapter was trained with.
    for attr, key in HF_PROJECTION_KEYS.items():
        if key not in tensors:
            continue
        buffer, saved = getattr(shared, attr), tensors[key]
        if tuple(buffer.shape) != tuple(saved.shape):
            raise AdapterError(
                f"adapter does not fit this model: {key} has shape {tuple(saved.shape)}, the targeted layers "
                f"need {tuple(buffer.shape)} (wrong base model?)"
            )
        with torch.no_grad():
            buffer.copy_(saved.to(buffer.dtype))
    rest = {key: value for key, value in tensors.items() if key not in HF_PROJECTION_KEYS.values()}
    return {key.removeprefix(HF_KEY_PREFIX): value for key, value in rest.items()}


METHOD = MethodImplementation(apply_method=apply_method, adapter_tensors=adapter_tensors, load_tensors=load_tensors)
