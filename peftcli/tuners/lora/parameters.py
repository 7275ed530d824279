"""LoRA on a parameter rather than a layer: the fused experts of mixture-of-experts models (`target_parameters`).

In transformers 5, Mixtral, Qwen2-MoE and their kin keep all experts of a block in one 3-D parameter per
projection (`experts.gate_up_proj`: experts x out x in), read inside the experts module's own forward. No layer
wraps them, so the update is put into the parameter itself: for each forward the module sees W + s·B_e·A_e per
expert e, and the merge adds the same update to the stored tensor.

The on-disk form is HF PEFT's (`target_parameters`): one wrapper per parameter, nested when one module has
several (the first registered parameter innermost), keys `<module>[.base_layer...].lora_A.weight`.
A is (r·experts x in), expert e's rows e·r..e·r+r-1; B is (out x r·experts), expert e's columns e, e+E, ....
A 2-D parameter is one "expert". Some modules store (experts x in x out) and say so with `is_transposed`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from peftcli.tuners.lora.modules import ADAPTER_DTYPE, LoraLayer, reset_factors


class LoraParameter(LoraLayer):
    """The LoRA update of one parameter of `base_layer` (a module, or another LoraParameter of the same module)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, rslora: bool, init: str):
        super().__init__(base_layer, r, alpha, 0.0, rslora)
        self.parameter_name = parameter_name
        param = self.parameter()
        shape = tuple(param.shape)
        if len(shape) == 3:
            self.num_experts, first, second = shape
            self.transposed = bool(getattr(self.holder(), "is_transposed", False))
            self.in_features, self.out_features = (first, second) if self.transposed else (second, first)
        else:
            (self.out_features, self.in_features), self.num_experts, self.transposed = shape, 1, False
        kwargs = {"bias": False, "device": param.device, "dtype": ADAPTER_DTYPE}
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, **kwargs)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, **kwargs)
        reset_factors(self.lora_A.weight, self.lora_B.weight, init, r)

    def holder(self) -> nn.Module:
        """The model's own module that owns the parameter (below any other LoraParameter of it)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return getattr(self.holder(), self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.parameter()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def delta_weight(self) -> torch.Tensor:
        """s·B_e·A_e for every expert, shaped like the parameter, fp32."""
        experts, r = self.num_experts, self.r
        a = self.lora_A.weight.reshape(experts, r, self.in_features)
        b = self.lora_B.weight.reshape(self.out_features, r, experts)
        layout = "e i o" if self.transposed else "e o i"
        delta = torch.einsum(f"o r e, e r i -> {layout}", b, a) * self.scaling
        return delta.reshape(self.parameter().shape)

    def delta_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `delta_weight()` seen as (experts·rows x last dim), computed one expert at a time, fp32.

        For a merge that writes the checkpoint's per-expert tensors without the whole stack's update at once.
        """
        experts, r = self.num_experts, self.r
        a = self.lora_A.weight.reshape(experts, r, self.in_features)  # A_e: r x in
        b = self.lora_B.weight.reshape(self.out_features, r, experts).permute(2, 0, 1)  # B_e: out x r
        left, right = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        per_expert = left.shape[1]
        expert_of, row_of = rows // per_expert, rows % per_expert
        out = torch.empty(len(rows), right.shape[-1], dtype=right.dtype, device=right.device)
        for expert in expert_of.unique().tolist():
            mask = expert_of == expert
            out[mask] = left[expert][row_of[mask]] @ right[expert]
        return out.mul_(self.scaling)

    def merge(self) -> None:
        """Add the update to the stored parameter (once), keeping its dtype."""
        self._shift(+1)

    def unmerge(self) -> None:
        self._shift(-1)

    def _shift(self, sign: int) -> None:
        if self.merged == (sign > 0):
            return
        param = self.parameter()
        with torch.no_grad():
            param.data = param.data.float().add_(self.delta_weight().to(param.device), alpha=sign).to(param.dtype)
        self.merged = sign > 0

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        param = self.parameter()
        updated = param + self.delta_weight().to(param.dtype)
        # The path from base_layer to the parameter passes every LoraParameter below this one.
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        path = "base_layer." * depth + self.parameter_name
        return functional_call(self.base_layer, {path: updated}, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name}, experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"
