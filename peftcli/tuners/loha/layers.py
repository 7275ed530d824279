"""LoHa layers: ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r on Linear, Conv1d and Conv2d, with HF PEFT's tensor names.

A conv kernel is flattened into the input dimension (out, in/groups · k...), unless `use_effective_conv2d` is set
and the kernel is larger than 1: then each product is a Tucker rebuild from an r x r x kh x kw core (`hada_t1`,
`hada_t2`) and (r, out), (r, in) factors. Initialisation as HF PEFT: every factor kaiming-uniform except w2_b,
which is zero, so ΔW = 0 at the start.
"""

from __future__ import annotations

import math

from torch import nn

from peftcli.models.quantized_layers import weight_shape
from peftcli.tuners.loha.spec import LohaParams
from peftcli.tuners.lycoris import LycorisLayer, kaiming_, tucker_rebuild, wrap_targets
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation


class LohaLayer(LycorisLayer):
    """A frozen layer plus the LoHa update."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
    ):
        # HF PEFT always rescales the rows kept by LoHa's rank dropout.
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout, rank_dropout_scale=True)
        out_dim, in_dim, *kernel = weight_shape(base_layer)
        self.tucker = use_effective_conv2d and any(k != 1 for k in kernel)
        if self.tucker:
            kh, kw = (*kernel, 1)[:2]  # a Conv1d kernel k is handled as (k, 1)
            for i in ("1", "2"):
                self.add_factor(f"hada_t{i}", r, r, kh, kw)
                self.add_factor(f"hada_w{i}_a", r, out_dim)
                self.add_factor(f"hada_w{i}_b", r, in_dim)
        else:
            flat_in = math.prod(weight_shape(base_layer)[1:])
            for i in ("1", "2"):
                self.add_factor(f"hada_w{i}_a", out_dim, r)
                self.add_factor(f"hada_w{i}_b", r, flat_in)
        for name, param in self._parameters.items():
            nn.init.zeros_(param) if name == "hada_w2_b" else kaiming_(param)

    def _product(self, i: str):
        w_a, w_b = self.factor(f"hada_w{i}_a"), self.factor(f"hada_w{i}_b")
        if self.tucker:
            return tucker_rebuild(self.factor(f"hada_t{i}"), w_a, w_b)
        return w_a @ w_b

    def build_delta(self):
        """(w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r (or the Tucker rebuilds for an effective conv)."""
        return self._product("1") * self._product("2") * self.scaling


def apply_method(model: nn.Module, params: LohaParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted Linear/Conv layer of `model` in a LohaLayer."""

    def make(base: nn.Module, r: int, alpha: float) -> LohaLayer:
        return LohaLayer(base, r, alpha, params.rank_dropout, params.module_dropout, params.use_effective_conv2d)

    return AppliedMethod(wrap_targets(model, params, "loha", make))


METHOD = MethodImplementation(apply_method=apply_method)
