"""LoKr layers: ΔW = kron(w1, w2) · alpha/r on Linear, Conv1d and Conv2d, with HF PEFT's tensor names and shapes.

With out = a·b and in = c·d (`factorization`, a <= b and c <= d for the default split):
- w1 (a x c) is `lokr_w1`, or `lokr_w1_a` (a x r) @ `lokr_w1_b` (r x c) with decompose_both when r < max(a, c)/2;
- w2 (b x d) is `lokr_w2` (b x d x kernel for convs), or low-rank when r < max(b, d)/2: `lokr_w2_a` (b x r) @
  `lokr_w2_b` (r x d·kernel), or with use_effective_conv2d on a kernel larger than 1 a Tucker rebuild from
  `lokr_t2` (r x r x kh x kw), `lokr_w2_a` (r x b), `lokr_w2_b` (r x d).
The Kronecker product is reshaped to the base weight's shape as HF PEFT does (for a Conv1d with a full w2 that is
the product of a 2-D and a 3-D factor), so tensors move between the two libraries unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.models.quantized_layers import weight_shape
from peftcli.tuners.lokr.spec import LokrParams, factorization
from peftcli.tuners.lycoris import LycorisLayer, kaiming_, tucker_rebuild, wrap_targets
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation


class LokrLayer(LycorisLayer):
    """A frozen layer plus the LoKr update."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        use_effective_conv2d: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        init: str = "default",
    ):
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout, rank_dropout_scale)
        out_dim, in_dim, *kernel = weight_shape(base_layer)
        a, b = factorization(out_dim, decompose_factor)
        c, d = factorization(in_dim, decompose_factor)

        if decompose_both and r < max(a, c) / 2:
            self.add_factor("lokr_w1_a", a, r)
            self.add_factor("lokr_w1_b", r, c)
        else:
            self.add_factor("lokr_w1", a, c)

        if r >= max(b, d) / 2:
            self.add_factor("lokr_w2", b, d, *kernel)
        elif use_effective_conv2d and any(k != 1 for k in kernel):
            kh, kw = (*kernel, 1)[:2]  # a Conv1d kernel k is handled as (k, 1)
            self.add_factor("lokr_t2", r, r, kh, kw)
            self.add_factor("lokr_w2_a", r, b)
            self.add_factor("lokr_w2_b", r, d)
        else:
            flat_kernel = int(torch.Size(kernel).numel())
            self.add_factor("lokr_w2_a", b, r)
            self.add_factor("lokr_w2_b", r, d * flat_kernel)
        self.reset_factors(init)

    def reset_factors(self, init: str) -> None:
        """Zero one side so ΔW = 0: w1 (or w1_a) by default, w2 (or w2_b) for 'lycoris'; the rest random."""
        zeroed = ("lokr_w2", "lokr_w2_b") if init == "lycoris" else ("lokr_w1", "lokr_w1_a")
        for name, param in self._parameters.items():
            nn.init.zeros_(param) if name in zeroed else kaiming_(param)

    def _w1(self) -> torch.Tensor:
        w1 = self.factor("lokr_w1")
        return w1 if w1 is not None else self.factor("lokr_w1_a") @ self.factor("lokr_w1_b")

    def _w2(self) -> torch.Tensor:
        w2 = self.factor("lokr_w2")
        if w2 is not None:
            return w2
        core = self.factor("lokr_t2")
        if core is not None:
            # einsum may give a size-1 kernel axis (Conv1d) an odd stride, which torch.kron cannot view: copy
            # into standard strides (HF PEFT 0.21 fails right there for Conv1d).
            rebuilt = tucker_rebuild(core, self.factor("lokr_w2_a"), self.factor("lokr_w2_b"))
            return rebuilt.clone(memory_format=torch.contiguous_format)
        return self.factor("lokr_w2_a") @ self.factor("lokr_w2_b")

    def build_delta(self) -> torch.Tensor:
        """kron(w1, w2) · alpha/r, w1 given trailing unit kernel dimensions when w2 is a 4-D kernel."""
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2) * self.scaling


def apply_method(model: nn.Module, params: LokrParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted Linear/Conv layer of `model` in a LokrLayer."""

    def make(base: nn.Module, r: int, alpha: float) -> LokrLayer:
        return LokrLayer(
            base,
            r,
            alpha,
            rank_dropout=params.rank_dropout,
            module_dropout=params.module_dropout,
            rank_dropout_scale=params.rank_dropout_scale,
            use_effective_conv2d=params.use_effective_conv2d,
            decompose_both=params.decompose_both,
            decompose_factor=params.decompose_factor,
            init=params.init,
        )

    return AppliedMethod(wrap_targets(model, params, "lokr", make))


METHOD = MethodImplementation(apply_method=apply_method)
