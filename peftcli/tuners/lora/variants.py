"""How a LoRA layer applies its update: plain LoRA, or DoRA. A layer holds one of these as its `variant`.

A variant only talks to the layer through a few geometry methods that each layer kind defines:
`delta_weight()` (the scaled update shaped like the base weight, fp32), `add_delta_(w, sign)` (the same added
into w in place), `weight_norm(w)` (DoRA's norm per output feature, shaped like the magnitude), `weight_factor(f)`
(a magnitude-shaped tensor viewed so it scales the weight per output feature), `output_without_bias(result)`
and `base_output(x)` (the base layer's
product without its bias). DoRA reads the base weight through `float_weight`, which dequantizes a
bitsandbytes layer.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.models.quantized_layers import float_weight, weight_shape


class PlainLora:
    """W x + s·B A x: the update is added as it is."""

    name = "lora"

    def setup(self, layer) -> None:
        """Nothing to add beyond A and B."""

    def output_delta(self, layer, x, dropped_x, result, lora_out: torch.Tensor) -> torch.Tensor:
        """What the branch adds to the base output."""
        return lora_out

    def merged_weight(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (fp32, updated in place) with the update folded in."""
        return layer.add_delta_(weight)

    def unmerged_weight(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight`."""
        return layer.add_delta_(weight, -1.0)


class Dora:
    """DoRA (arXiv 2402.09353): W' = m · (W + s·B A) / ||W + s·B A||, the norm taken per output feature.

    The magnitude m starts as the norm itself, so the layer starts as the identity. As the paper (section 4.3)
    and HF PEFT do, the norm is treated as a constant in the backward pass: it follows the update but gets no
    gradient. In the forward the base product is reused, so DoRA adds (m/n - 1)·W x + (m/n)·s·B A x.
    """

    name = "dora"

    def setup(self, layer) -> None:
        """Create `lora_magnitude_vector` from the layer's current weight and update."""
        weight = layer.base_layer.weight
        with torch.no_grad():
            if weight.is_meta:
                magnitude = layer.weight_norm(torch.empty(weight_shape(layer.base_layer), device="meta"))
            else:
                magnitude = layer.weight_norm(float_weight(layer.base_layer) + layer.delta_weight())
        layer.lora_magnitude_vector = nn.Parameter(magnitude.float().contiguous())

    def _current_norm(self, layer) -> torch.Tensor:
        with torch.no_grad():
            return layer.weight_norm(float_weight(layer.base_layer) + layer.delta_weight())

    def output_delta(self, layer, x, dropped_x, result, lora_out: torch.Tensor) -> torch.Tensor:
        """What the branch adds to the base output: (m/n - 1)·(W x) + (m/n)·s·B A x."""
        factor = layer.lora_magnitude_vector / self._current_norm(layer)
        # Reuse the base product unless dropout changed the input; then it has to be taken again on it.
        reuse = dropped_x is x
        base = layer.output_without_bias(result).to(lora_out.dtype) if reuse else layer.base_output(dropped_x)
        return (factor - 1) * base + factor * lora_out

    def merged_weight(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """m/n · (W + ΔW); n is kept so that unmerging can invert exactly this step."""
        updated = weight + layer.delta_weight()
        norm = layer.weight_norm(updated)
        layer.dora_merge_norm = norm
        return layer.weight_factor(layer.lora_magnitude_vector / norm) * updated

    def unmerged_weight(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """W' · n/m - ΔW, with the norm recorded at merge time."""
        factor = layer.weight_factor(layer.lora_magnitude_vector / layer.dora_merge_norm)
        layer.dora_merge_norm = None
        return weight / factor - layer.delta_weight()


PLAIN = PlainLora()
DORA = Dora()
