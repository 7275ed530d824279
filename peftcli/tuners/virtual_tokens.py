"""Soft prompts on a plain transformers model, through forward hooks: what prompt tuning, P-tuning and prefix
tuning share.

`install_virtual_tokens` hooks the model so that `model(input_ids=..., attention_mask=...)` and
`model.generate(...)` see the method's virtual tokens without any wrapper class:

- "embeds" style (prompt tuning, P-tuning): the virtual-token vectors go in front of the input embeddings
  (of the encoder, for encoder-decoder models);
- "prefix" style (prefix tuning): they become past keys and values of every attention layer (of the decoder,
  for encoder-decoder models), as a transformers cache.

Either way the attention mask gets ones in front and a causal LM's logits keep the length of `input_ids`
(the virtual positions are cut off), so loss code written for the bare model is unchanged. The numerics
follow HF PEFT's PeftModel forward (virtual tokens first, a fresh prompt whenever the cache is empty), which
is what makes adapters interchangeable. One deliberate difference: HF PEFT drops position ids a caller
passes with prompt tuning and P-tuning; here they are kept, moved behind the virtual tokens (as HF PEFT
does for prefix tuning). Without position ids nothing differs; with them (`generate` passes them for
left-padded prompts) the real tokens sit right after the prompt, where right-padded training put them.

The method's trainable part is a `PromptSource` attached to the model as `prompt_encoder`. On disk HF PEFT
stores only its final output (`prompt_embeddings`); an adapter loaded from disk keeps that output in the
source's `loaded` buffer and never runs the reparametrisation encoder again.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftcli.errors import AdapterError, PeftCliError

PROMPT_ATTR = "prompt_encoder"
HF_PROMPT_KEY = "prompt_embeddings"
HF_PROMPT_PREFIX = "base_model."  # HF PEFT keys for prompt methods' extra modules (heads) have no `model.` part
Style = Literal["embeds", "prefix"]


@dataclass(frozen=True)
class PromptShape:
    """The sizes HF PEFT records for a prompt method (PromptLearningConfig fields)."""

    num_virtual_tokens: int
    token_dim: int
    num_layers: int
    num_attention_heads: int
    num_transformer_submodules: int

    @property
    def total_tokens(self) -> int:
        """Rows of the prompt table: HF PEFT keeps one set of virtual tokens per transformer stack."""
        return self.num_virtual_tokens * self.num_transformer_submodules

    def config_fields(self) -> dict:
        """The adapter_config.json fields HF PEFT needs to rebuild the prompt."""
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_transformer_submodules": self.num_transformer_submodules,
        }


def check_task(spec, task: str) -> None:
    """Refuse a task the method does not claim (token classification, for instance)."""
    if task not in spec.capabilities.task_types:
        raise PeftCliError(
            f"model.task: {spec.name} supports {', '.join(spec.capabilities.task_types)}, not {task}; "
            "pick another method for this task"
        )


def gathered(params):
    """A context in which DeepSpeed ZeRO-3 parameters are whole (a no-op for ordinary parameters)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()


def _first(config: dict, *keys: str):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def prompt_shape(model: nn.Module, num_virtual_tokens: int, task: str, prefix: bool = False) -> PromptShape:
    """The prompt sizes of a model, read from its config the way HF PEFT does.

    For prefix tuning on grouped-query attention, the prefix holds key/value heads, so `token_dim` becomes
    head_dim x key/value heads and `num_attention_heads` the number of key/value heads.
    """
    config = model.config
    raw = config.to_dict()
    raw = raw.get("text_config") or raw
    num_layers = getattr(config, "num_hidden_layers", None) or _first(raw, "num_hidden_layers", "num_layers", "n_layer")
    token_dim = _first(raw, "hidden_size", "n_embd", "d_model")
    heads = _first(raw, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if not (num_layers and token_dim and heads):
        raise PeftCliError(
            f"method.name: cannot read the layer count, width and attention heads of this {config.model_type} "
            "model from its config; prompt methods need them"
        )
    if prefix and raw.get("num_key_value_heads"):
        head_dim = raw.get("head_dim") or token_dim // heads
        heads = raw["num_key_value_heads"]
        token_dim = head_dim * heads
    if prefix and raw.get("d_kv") and raw["d_kv"] * heads != token_dim:
        raise PeftCliError(
            f"method.name: prefix tuning lays keys and values out as width / heads = {token_dim // heads} per "
            f"head, but this model's attention heads are {raw['d_kv']} wide; use prompt_tuning or p_tuning"
        )
    if prefix and task == "seq2seq" and raw.get("num_decoder_layers") not in (None, num_layers):
        raise PeftCliError(
            f"method.name: prefix tuning needs as many decoder layers as encoder layers ({num_layers}), this "
            f"model has {raw['num_decoder_layers']}; use prompt_tuning or p_tuning"
        )
    submodules = 2 if task == "seq2seq" else 1
    return PromptShape(num_virtual_tokens, int(token_dim), int(num_layers), int(heads), submodules)


class PromptSource(nn.Module):
    """A method's trainable prompt: returns the final table of virtual-token vectors, one row per token.

    Subclasses implement `encode` (the table computed from their parameters). After `load_prompt`, the saved
    table is returned as it is, like HF PEFT in inference mode.
    """

    def __init__(self, table_shape: tuple[int, int]):
        super().__init__()
        self.table_shape = tuple(table_shape)  # (rows, width) of the table `forward` returns
        # Token indices, looked up through the embedding module (not .weight) so that sharded parameters
        # (ZeRO-3) are gathered by the module call.
        self.register_buffer("indices", torch.arange(self.table_shape[0]), persistent=False)
        self.register_buffer("loaded", None, persistent=False)

    def encode(self) -> torch.Tensor:
        """The prompt table computed from the trainable parameters."""
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        return self.loaded if self.loaded is not None else self.encode()

    def check_table(self, table: torch.Tensor) -> None:
        """Refuse a saved prompt table of the wrong shape."""
        if tuple(table.shape) != self.table_shape:
            raise AdapterError(
                f"adapter does not fit this model: {HF_PROMPT_KEY} has shape {tuple(table.shape)}, "
                f"the model needs {self.table_shape} (wrong base model or num_virtual_tokens?)"
            )

    def load_prompt(self, table: torch.Tensor) -> None:
        """Use a saved prompt table from now on (the encoder, if any, is bypassed)."""
        self.check_table(table)
        device = next((p.device for p in self.parameters()), table.device)
        self.loaded = table.detach().to(device=device, dtype=torch.float32).clone()


def prompt_source(model: nn.Module) -> PromptSource:
    """The PromptSource a prompt method attached to the model."""
    source = getattr(model, PROMPT_ATTR, None)
    if not isinstance(source, PromptSource):
        raise AdapterError("the model carries no prompt method")
    return source


@torch.no_grad()
def saved_prompt_table(model: nn.Module, named: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prompt table to save, computed from the adapter tensors `named` (full tensors, e.g. gathered).

    Running the source functionally on `named` (not on its live parameters) keeps saving right when the live
    parameters are shards; eval mode keeps the LSTM's dropout out of the saved table.
    """
    source = prompt_source(model)
    if source.loaded is not None:
        return source.loaded.detach().to("cpu").contiguous()
    start = PROMPT_ATTR + "."
    weights = {name[len(start) :]: tensor for name, tensor in named.items() if name.startswith(start)}
    weights["indices"] = source.indices.to(next(iter(weights.values())).device)
    was_training = source.training
    source.eval()
    try:
        table = torch.func.functional_call(source, weights, ())
    finally:
        source.train(was_training)
    return table.detach().float().to("cpu").contiguous()


def prompt_adapter_tensors(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors in HF PEFT's layout: `prompt_embeddings` plus `base_model.<name>` for trained heads."""
    out = {HF_PROMPT_KEY: saved_prompt_table(model, named)}
    for name, tensor in named.items():
        if not name.startswith(PROMPT_ATTR + "."):
            out[HF_PROMPT_PREFIX + name] = tensor
    return out


def prompt_load_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], table_param: str | None = None
) -> dict[str, torch.Tensor]:
    """Parameter-named tensors from HF PEFT's layout.

    With `table_param`, `prompt_embeddings` is that parameter's value (prompt tuning: the table is the
    parameter). Otherwise it goes into the source's `loaded` buffer and the encoder parameters keep their
    values, so the loader finds every adapter parameter and the model computes with the saved table.
    """
    source = prompt_source(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key == HF_PROMPT_KEY:
            continue
        if key.startswith("base_model.model."):
            out[key[len("base_model.model.") :]] = tensor
        elif key.startswith(HF_PROMPT_PREFIX):
            out[key[len(HF_PROMPT_PREFIX) :]] = tensor
        else:
            out[key] = tensor  # reported as unexpected by the loader
    if HF_PROMPT_KEY not in tensors:
        raise AdapterError(f"adapter does not fit this model: no {HF_PROMPT_KEY} tensor in the adapter file")
    table = tensors[HF_PROMPT_KEY]
    if table_param is not None:
        source.check_table(table)
        out[table_param] = table
        return out
    source.load_prompt(table)
    for name, param in source.named_parameters():
        out[f"{PROMPT_ATTR}.{name}"] = param.detach().clone()
    return out


# --- hooks ----------------------------------------------------------------------------------------------------


def cache_length(cache) -> int:
    """Tokens already in a cache (its self-attention part for encoder-decoder caches); 0 for None."""
    if cache is None:
        return 0
    inner = getattr(cache, "self_attention_cache", cache)
    if hasattr(inner, "get_seq_length"):
        return int(inner.get_seq_length())
    return int(inner[0][0].shape[-2])  # legacy tuple of (key, value) per layer


_FORWARD_NAMES: dict[type, list[str]] = {}
_CACHE_NAMES: dict[type, str | None] = {}
# transformers 5.24 renamed the cache argument of every forward and of generate from `past_key_values` to
# `cache` (the old name is still accepted, with a deprecation, until 5.40); both names are read here.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str | None:
    """The name under which this model's forward takes its key/value cache; None if it takes none."""
    cls = type(model)
    if cls not in _CACHE_NAMES:
        # A task head (BertForSequenceClassification) may pass the cache on through **kwargs: ask its base too.
        base = getattr(model, "base_model", model)
        names = set(inspect.signature(cls.forward).parameters) | set(inspect.signature(type(base).forward).parameters)
        _CACHE_NAMES[cls] = next((name for name in CACHE_ARGUMENTS if name in names), None)
    return _CACHE_NAMES[cls]


def _take_cache(kwargs: dict):
    """The cache a caller passed under either name, removed from `kwargs`."""
    found = [kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs]
    return next((cache for cache in found if cache is not None), None)


def _named(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional forward arguments moved into keyword arguments."""
    kwargs = dict(kwargs)
    if args:
        cls = type(module)
        if cls not in _FORWARD_NAMES:
            _FORWARD_NAMES[cls] = list(inspect.signature(cls.forward).parameters)[1:]
        for name, value in zip(_FORWARD_NAMES[cls], args, strict=False):
            kwargs[name] = value
    return kwargs


def _batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise ValueError("cannot tell the batch size: pass input_ids or inputs_embeds")


def _with_ones(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A 2-D attention mask with `count` ones in front (the virtual tokens are always attended to)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError("prompt methods need a 2-D attention mask (batch, length)")
    return torch.cat([mask.new_ones((mask.shape[0], count)), mask], dim=1)


def _target_dtype(reference: torch.Tensor) -> torch.dtype:
    device = reference.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return reference.dtype


class VirtualTokenHooks:
    """The hooks of one model: they add the virtual tokens and trim what the caller must not see.

    Holds references to the source and the embedding only (both submodules of the model), so a deep copy
    of the model copies the hooks along with it.
    """

    def __init__(self, source: PromptSource, embed: nn.Module, shape: PromptShape, task: str, style: Style):
        self.source = source
        self.embed = embed
        self.shape = shape
        self.task = task
        self.style = style
        self.real_length: int | None = None  # length of the caller's input in the current forward

    @property
    def count(self) -> int:
        return self.shape.num_virtual_tokens

    def prompts(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, virtual tokens, width) vectors for the input embeddings."""
        table = self.source()[: self.count].to(like.dtype)
        return table.unsqueeze(0).expand(batch, -1, -1)

    def prefix_cache(self, batch: int):
        """A fresh cache holding the prefix keys and values of every layer, in HF PEFT's layout."""
        from transformers import DynamicCache, EncoderDecoderCache

        s = self.shape
        table = self.source()
        table = table.to(_target_dtype(self.embed.weight))
        head_dim = s.token_dim // s.num_attention_heads
        # rows: virtual tokens; columns: (layer, key/value) x heads x head_dim
        kv = table.view(1, s.num_virtual_tokens, s.num_layers * 2, s.num_attention_heads, head_dim)
        kv = kv.expand(batch, -1, -1, -1, -1)
        if s.num_transformer_submodules == 2:
            kv = torch.cat([kv, kv], dim=2)  # HF PEFT's layout for encoder-decoder models
        per_layer = kv.permute(2, 0, 3, 1, 4).split(2 * s.num_transformer_submodules)
        self_attention = DynamicCache([(chunk[0], chunk[1]) for chunk in per_layer])
        if s.num_transformer_submodules == 2:
            # Only the decoder's self-attention gets the prefix; cross-attention is computed from the encoder.
            return EncoderDecoderCache(self_attention, DynamicCache())
        return self_attention

    # top model: inputs

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        kwargs = _named(module, args, kwargs)
        if self.task == "seq2seq":
            return (), self._before_seq2seq(module, kwargs)
        batch = _batch_size(kwargs)
        count = self.count
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        self.real_length = (ids if ids is not None else embeds).shape[1]
        positions = kwargs.get("position_ids")
        cache = _take_cache(kwargs)
        fresh = cache_length(cache) == 0
        if self.style == "prefix" and fresh:
            cache = self.prefix_cache(batch)
        if cache is not None:
            kwargs[cache_argument(module) or "past_key_values"] = cache
        if self.style == "prefix":
            if positions is not None:
                kwargs["position_ids"] = positions + count
        elif fresh:
            if embeds is None:
                embeds = self.embed(ids)
            kwargs["inputs_embeds"] = torch.cat([self.prompts(batch, embeds), embeds], dim=1)
            kwargs["input_ids"] = None
            if positions is not None:
                front = torch.arange(count, device=positions.device, dtype=positions.dtype)
                front = front.expand(*positions.shape[:-1], count)
                kwargs["position_ids"] = torch.cat([front, positions + count], dim=-1)
            labels = kwargs.get("labels")
            if labels is not None and self.task == "causal_lm":
                kwargs["labels"] = torch.cat([labels.new_full((batch, count), -100), labels], dim=1)
            token_types = kwargs.get("token_type_ids")
            if token_types is not None:
                kwargs["token_type_ids"] = torch.cat([token_types.new_zeros((batch, count)), token_types], dim=1)
        elif positions is not None:  # a later step of incremental decoding: the cache holds the prompt
            kwargs["position_ids"] = positions + count
        kwargs["attention_mask"] = _with_ones(kwargs.get("attention_mask"), count)
        return (), kwargs

    def _before_seq2seq(self, module: nn.Module, kwargs: dict) -> dict:
        count = self.count
        if self.style == "prefix":
            cache = _take_cache(kwargs)
            if cache_length(cache) == 0:
                cache = self.prefix_cache(_batch_size(kwargs))
            kwargs[cache_argument(module) or "past_key_values"] = cache
            kwargs["decoder_attention_mask"] = _with_ones(kwargs.get("decoder_attention_mask"), count)
        else:
            # The encoder hook adds the virtual tokens; the decoder's cross-attention must see them too.
            kwargs["attention_mask"] = _with_ones(kwargs.get("attention_mask"), count)
        return kwargs

    # top model: outputs

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        length, self.real_length = self.real_length, None
        if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) or (logits, ...)
            index = 1 if kwargs.get("labels") is not None else 0
            logits = output[index] if len(output) > index else None
        else:
            index, logits = None, getattr(output, "logits", None)
        if length is None or logits is None or logits.dim() != 3 or logits.shape[1] <= length:
            return output
        logits = logits[:, -length:]  # logits are always the last positions (logits_to_keep)
        if index is None:
            output["logits"] = logits
            return output
        return (*output[:index], logits, *output[index + 1 :])

    # encoder of an encoder-decoder model

    def before_encoder(self, module: nn.Module, args: tuple, kwargs: dict):
        kwargs = _named(module, args, kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.embed(ids)
        batch, length = embeds.shape[:2]
        kwargs["inputs_embeds"] = torch.cat([self.prompts(batch, embeds), embeds], dim=1)
        kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] == length:  # called directly (generate), not from the model
            kwargs["attention_mask"] = _with_ones(mask, self.count)
        return (), kwargs


def install_virtual_tokens(
    model: nn.Module, source: PromptSource, shape: PromptShape, task: str, style: Style
) -> VirtualTokenHooks:
    """Attach `source` as `model.prompt_encoder` and hook the model so every forward includes the prompt."""
    if hasattr(model, PROMPT_ATTR):
        raise PeftCliError(f"method.name: the model already has an attribute {PROMPT_ATTR!r}; cannot add a prompt")
    if style == "prefix" and cache_argument(model) is None:
        raise PeftCliError(
            f"method.name: prefix tuning puts keys and values in the attention cache, and {type(model).__name__} "
            "takes no cache; use prompt_tuning or p_tuning"
        )
    embed = model.get_input_embeddings()
    source.to(embed.weight.device)
    model.add_module(PROMPT_ATTR, source)
    hooks = VirtualTokenHooks(source, embed, shape, task, style)
    model.register_forward_pre_hook(hooks.before_forward, with_kwargs=True)
    if task == "causal_lm":
        model.register_forward_hook(hooks.after_forward, with_kwargs=True)
    if task == "seq2seq" and style == "embeds":
        model.get_encoder().register_forward_pre_hook(hooks.before_encoder, with_kwargs=True)
    return hooks
