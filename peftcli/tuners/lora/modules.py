"""The LoRA layer classes: a frozen base layer plus a trainable low-rank branch, y = base(x) + s·B A dropout(x).

One class per layer kind (LoraLinear, LoraEmbedding, LoraConv), each one level below `LoraLayer`: the kind
says how the branch runs and what its update looks like as a weight; the variant (plain LoRA or DoRA, see
variants.py) says how that update is applied. A and B (and DoRA's magnitude) stay fp32 whatever the base
dtype: the input is cast to the adapter's dtype and the branch's output back to the base's.
Attribute names equal HF PEFT's saved keys (adapter name removed), so our parameter names are its keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.quantized_layers import float_weight
from peftcli.tuners.lora.init import decompose
from peftcli.tuners.lora.spec import changes_base
from peftcli.tuners.lora.variants import DORA, PLAIN
from peftcli.tuners.protocol import AdapterLayer

ADAPTER_DTYPE = torch.float32  # A, B and magnitudes are created in fp32 whatever the base dtype


def reset_factors(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """B = 0 so the layer starts as the identity; A kaiming-uniform (default) or N(0, 1/r) (gaussian)."""
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: scaling, dropout, the variant, merging, and PiSSA/OLoRA's initial factors.

    `lora_initial_A`/`lora_initial_B` are buffers (not parameters, not saved in any state dict): the factors
    PiSSA/OLoRA started from, needed to save the adapter as a plain LoRA that fits the original base.
    """

    factor_names: tuple[str, str] = ("lora_A.weight", "lora_B.weight")  # A and B under the layer's name

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.variant = PLAIN
        self.merged = False
        self.shares_weight_with: tuple[str, ...] = ()  # other modules using the same weight (tied embeddings)
        self.dora_merge_norm: torch.Tensor | None = None
        self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("lora_initial_A", None, persistent=False)
        self.register_buffer("lora_initial_B", None, persistent=False)

    # --- what each layer kind defines ------------------------------------------------------------------------

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable A and B."""
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """B A x, unscaled, in the adapter's dtype."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The scaled update s·B·A shaped like the base weight, fp32."""
        raise NotImplementedError

    def add_delta_(self, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """weight += sign·s·B·A in place (weight is fp32); returns weight."""
        return weight.add_(self.delta_weight(), alpha=sign)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's norm of a weight-shaped tensor per output feature, shaped like the magnitude."""
        raise NotImplementedError

    def weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """A magnitude-shaped tensor viewed so that it scales the weight per output feature."""
        raise NotImplementedError

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as the branch takes it: in the adapter's dtype."""
        return x.to(self.factors()[0].dtype)

    def output_without_bias(self, result: torch.Tensor) -> torch.Tensor:
        """The base output minus the base bias."""
        return result

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's product on `x` without its bias, in x's dtype (DoRA under dropout)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def finish_init(self, init: str, dora: bool) -> None:
        """PiSSA/OLoRA's starting point (kind permitting), then the variant's own tensors."""
        if changes_base(init):
            self.start_from_base(init)
        self.variant = DORA if dora else PLAIN
        self.variant.setup(self)

    def start_from_base(self, init: str) -> None:
        """Record the starting A and B for saving; kinds that decompose the weight override this."""
        a, b = self.factors()
        self.lora_initial_A = a.detach().clone()
        self.lora_initial_B = b.detach().clone()

    def merge(self) -> None:
        """Fold the update into the base weight (once; merging twice is a no-op). Keeps the base dtype."""
        if self.merged:
            return
        if self.shares_weight_with:
            raise PeftCliError(
                f"cannot merge: this LoRA layer's base weight is shared with {', '.join(self.shares_weight_with)} "
                "(tied weights), which would change too; keep the adapter unmerged or leave that layer out"
            )
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.data = self.variant.merged_weight(self, weight.data.float()).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.data = self.variant.unmerged_weight(self, weight.data.float()).to(weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        x = self.adapter_input(x)
        dropped = x if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.lora_dropout(x)
        lora_out = self.branch(dropped) * self.scaling
        # Compute the branch in the adapter's dtype, cast, then add: the order keeps half-precision error small.
        return result + self.variant.output_delta(self, x, dropped, result, lora_out).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, variant={self.variant.name}"


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear: A and B are bias-free linear layers (keys lora_A.weight, lora_B.weight)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: str,
        dora: bool = False,
    ):
        super().__init__(base_layer, r, alpha, dropout, rslora)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        if not changes_base(init):
            reset_factors(self.lora_A.weight, self.lora_B.weight, init, r)
        self.finish_init(init, dora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self, init: str) -> None:
        """Re-draw A and B as at creation (default or gaussian)."""
        reset_factors(self.lora_A.weight, self.lora_B.weight, init, self.r)

    def start_from_base(self, init: str) -> None:
        """PiSSA/OLoRA: A and B from the weight's SVD/QR; the base keeps the residual W - s·B·A."""
        weight = self.base_layer.weight
        if not weight.is_meta:
            a, b = decompose(weight, self.r, self.scaling, init)
            with torch.no_grad():
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.copy_(b)
                weight.data = (weight.data.float() - self.scaling * (b @ a)).to(weight.dtype)
        super().start_from_base(init)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def add_delta_(self, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        # one fused pass over the weight, no weight-sized temporaries: it is most of a large merge's time
        a, b = self.lora_A.weight.to(weight.dtype), self.lora_B.weight.to(weight.dtype)
        return weight.addmm_(b, a, alpha=sign * self.scaling)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=1)

    def weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(-1, 1)

    def output_without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, float_weight(self.base_layer).to(x.dtype))


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: the branch looks rows up in A^T (r x vocab, stored as vocab columns) then maps by B.

    Keys are HF PEFT's lora_embedding_A (r x num_embeddings) and lora_embedding_B (embedding_dim x r), plain
    parameters. As in HF PEFT, A starts at zero and B normal (whatever `init` says), and there is no dropout.
    """

    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: str,
        dora: bool = False,
    ):
        super().__init__(base_layer, r, alpha, 0.0, rslora)
        device = base_layer.weight.device
        shape_a, shape_b = (r, base_layer.num_embeddings), (base_layer.embedding_dim, r)
        self.lora_embedding_A = nn.Parameter(torch.zeros(shape_a, device=device, dtype=ADAPTER_DTYPE))
        self.lora_embedding_B = nn.Parameter(torch.empty(shape_b, device=device, dtype=ADAPTER_DTYPE))
        nn.init.normal_(self.lora_embedding_B)
        self.finish_init(init, dora)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # token ids

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        rows = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        out = rows @ self.lora_embedding_B.T
        # Embeddings that scale their output (Gemma3's embed_scale) scale the branch the same way.
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            out = out * torch.as_tensor(embed_scale, device=out.device).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=0)  # per embedding dimension, across the vocabulary

    def weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/Conv2d: A is a conv with the base kernel, stride and padding down to r channels, B a
    1x1 conv back up (keys lora_A.weight, lora_B.weight, as HF PEFT). Only groups=1, no dilation, zero padding.
    """

    def __init__(
        self,
        base_layer: nn.Conv1d | nn.Conv2d,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: str,
        dora: bool = False,
    ):
        super().__init__(base_layer, r, alpha, dropout, rslora)
        conv = type(base_layer)
        ones = (1,) * (base_layer.weight.dim() - 2)
        kwargs = {"bias": False, "device": base_layer.weight.device, "dtype": ADAPTER_DTYPE}
        self.lora_A = conv(
            base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride, base_layer.padding, **kwargs
        )
        self.lora_B = conv(r, base_layer.out_channels, ones, ones, **kwargs)
        reset_factors(self.lora_A.weight, self.lora_B.weight, init, r)
        self.finish_init(init, dora)

    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        product = self.lora_B.weight.view(weight.shape[0], self.r) @ self.lora_A.weight.view(self.r, -1)
        return product.view(weight.shape) * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        # Shaped (1, out, 1[, 1]) so that it scales the output channels of (N, out, ...) directly.
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(0, 1)

    def weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(-1, *(1,) * (self.base_layer.weight.dim() - 1))

    def output_without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias.view(1, -1, *(1,) * (result.dim() - 2))

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        return conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)


def layer_class(module: nn.Module) -> type[LoraLayer]:
    """The LoRA layer class for a base module (Linear, Embedding, or Conv1d/Conv2d)."""
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return LoraConv


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of the model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
