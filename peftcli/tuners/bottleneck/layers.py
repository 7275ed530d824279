"""Bottleneck adapters as wrappers around output layers: y = h + up(act(down(dropout(h)))), with h = base(x).

Houlsby et al. put the adapter on the output of the attention block's output projection and on the output of the
feed-forward block, *before* that sub-layer's residual connection and layer norm: LN(x + A(F(x))) with
A(h) = h + up(act(down(h))). Wrapping the sub-layer's last linear layer (o_proj / down_proj, BERT's
attention.output.dense / output.dense, T5's o / wo) computes exactly A(F(x)) where F ends in that layer, so the
block then adds its own residual and norm as usual. The only difference: models that apply dropout to the
sub-layer output (BERT's hidden dropout, T5's layer dropout) do so after the adapter rather than before it, which
changes nothing at inference. `pfeiffer` keeps only the feed-forward adapter, in the same form (Pfeiffer et al.'s
version also rearranges the residual and layer norm around it; that is not reproduced here).

The up-projection starts at zero, so the adapted model equals the base until training moves it. The adapter runs
in fp32 whatever the base dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.tuners.bottleneck.spec import BottleneckParams
from peftcli.tuners.inject import find_targets, replace_module
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# model_type -> (attention output projection, feed-forward output), as full-name regexes. Cross-attention
# outputs (T5 EncDecAttention.o, BART encoder_attn.out_proj) get no adapter, as in Houlsby's two per block.
_DECODER_STYLE = (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj")
_BERT_STYLE = (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense")
_T5_STYLE = (r".*\.SelfAttention\.o", r".*\.DenseReluDense\.wo")
_BART_STYLE = (r".*\.self_attn\.out_proj", r".*\.layers\.\d+\.fc2")
OUTPUT_LAYERS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "smollm3",
        ),
        _DECODER_STYLE,
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), _BERT_STYLE),
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5_STYLE),
    **dict.fromkeys(("bart", "mbart", "opt"), _BART_STYLE),
    "distilbert": (r".*\.attention\.out_lin", r".*\.ffn\.lin2"),
    "phi": (r".*\.self_attn\.dense", r".*\.mlp\.fc2"),
    "gpt_neox": (r".*\.attention\.dense", r".*\.mlp\.dense_4h_to_h"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),  # Conv1D layers, wrapped as linear ones
}


class BottleneckAdapter(nn.Module):
    """A frozen output layer followed by a trainable bottleneck with a residual connection."""

    def __init__(self, base_layer: nn.Linear, size: int, activation: str, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        hidden = base_layer.out_features
        device = base_layer.weight.device
        self.adapter_down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Down keeps nn.Linear's default (kaiming-uniform) init; a zero up-projection makes the adapter the identity.
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.base_layer(x)
        dtype = self.adapter_down.weight.dtype
        update = self.adapter_up(self.adapter_act(self.adapter_down(self.adapter_dropout(hidden.to(dtype)))))
        return hidden + update.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"bottleneck={self.adapter_down.out_features}"


def _placement_targets(model: nn.Module, params: BottleneckParams) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in OUTPUT_LAYERS:
        known = ", ".join(sorted(OUTPUT_LAYERS))
        raise PeftCliError(
            f"method.target_modules: bottleneck has no built-in placement for model type {model_type!r} "
            f"(known: {known}); set method.target_modules to the attention-output and feed-forward-output "
            "linear layers, e.g. [o_proj, down_proj]"
        )
    attention, feed_forward = OUTPUT_LAYERS[model_type]
    patterns = [attention, feed_forward] if params.placement == "houlsby" else [feed_forward]
    try:  # find_targets leaves task heads out and turns Conv1D layers (GPT-2) into linear ones
        return find_targets(model, "|".join(f"(?:{p})" for p in patterns), None, ("Linear",), "bottleneck")
    except PeftCliError:
        raise PeftCliError(
            f"method.target_modules: the {params.placement} placement found no output layer in this "
            f"{model_type} model; set method.target_modules to the layers to put adapters after"
        ) from None


def apply_method(model: nn.Module, params: BottleneckParams, context: AdapterContext) -> AppliedMethod:
    """Wrap the placement's output layers (or `target_modules`) of `model` in BottleneckAdapters."""
    if params.target_modules is not None:
        targets = find_targets(model, params.target_modules, None, ("Linear",), "bottleneck")
    else:
        targets = _placement_targets(model, params)
    for name in targets:
        base = model.get_submodule(name)
        size = params.size_for(base.out_features)
        replace_module(model, name, BottleneckAdapter(base, size, params.activation, params.dropout))
    return AppliedMethod(targets)


METHOD = MethodImplementation(apply_method=apply_method)
