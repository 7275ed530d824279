"""Answers from a loaded run: prompts rendered as its training prompts were, generated greedily or sampled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftcli.data.formats import ALPACA_PROMPT, Renderer
from peftcli.errors import PeftCliError
from peftcli.recipe.schema import DataSource
from peftcli.serve.load import LoadedModel

GENERATIVE = ("causal_lm", "seq2seq")


@dataclass(frozen=True)
class Sampling:
    """How new tokens are chosen: greedy at temperature 0, else sampled with top-p; `seed` makes it repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PeftCliError("--max-new-tokens: must be at least 1")
        if self.temperature < 0:
            raise PeftCliError("--temperature: must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise PeftCliError("--top-p: must be in (0, 1]")

    def options(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class PromptStyle:
    """How the run saw its prompts: through the chat template (with its system prompt) or as plain text."""

    chat: bool
    system: str | None = None
    alpaca: bool = False  # plain alpaca prompts sit inside the instruction frame


def prompt_style(loaded: LoadedModel) -> PromptStyle:
    """The run's training prompt style, read from its recipe's data.train (a bare merged model: the chat
    template when its tokenizer has one)."""
    train = ((loaded.recipe.get("data") or {}).get("train")) or {}
    if isinstance(train, list):  # a mixed run: prompts are rendered as its first source's were
        train = train[0]
    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    if not train:
        return PromptStyle(chat=has_template and loaded.task == "causal_lm")
    # Built without validation: the run's data file need not exist where its model answers.
    source = DataSource.model_construct(
        path=train.get("path", ""),
        format=train.get("format", "prompt_completion"),
        prompt_style=train.get("prompt_style", "auto"),
        system_prompt=train.get("system_prompt"),
        columns=train.get("columns") or {},
    )
    renderer = Renderer(source, loaded.tokenizer, True, "data.train", task=loaded.task)
    if source.format == "text" or loaded.task == "seq2seq":
        return PromptStyle(chat=False)
    if source.format in ("chat", "preference", "unpaired_preference") and not has_template:
        return PromptStyle(chat=False)
    chat = source.format == "chat" or renderer.uses_chat_template
    return PromptStyle(chat=chat, system=source.system_prompt, alpaca=source.format == "alpaca" and not chat)


def check_generative(loaded: LoadedModel, command: str) -> None:
    """Classifiers have no answers to generate."""
    if loaded.task not in GENERATIVE:
        raise PeftCliError(
            f"{loaded.source}: a {loaded.task} model labels text and does not generate; use peft eval instead of "
            f"peft {command}"
        )


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation up to the assistant's next turn, as the data renderer tokenizes chats."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(loaded: LoadedModel, style: PromptStyle, text: str) -> list[int]:
    """One prompt's token ids, rendered as the run's training prompts were."""
    tokenizer = loaded.tokenizer
    if style.chat:
        messages = [{"role": "system", "content": style.system}] if style.system else []
        return chat_ids(tokenizer, [*messages, {"role": "user", "content": text}])
    if style.alpaca:
        text = ALPACA_PROMPT.format(with_input="", instruction=text, input_block="")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def stop_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids: the tokenizer's, and any more the model's generation config names (end of turn)."""
    ids = [loaded.tokenizer.eos_token_id]
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompt: list[int], sampling: Sampling, streamer=None) -> list[int]:
    """The new token ids answering one prompt (a streamer sees them as they come)."""
    return _generate(loaded, [prompt], sampling, streamer)[0]


@torch.no_grad()
def complete(loaded: LoadedModel, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8, on_batch=None):
    """Answers to `prompts` in order, `batch_size` at a time: [{completion, tokens, finish}] ("stop" when an
    end-of-sequence token ended it, "length" when max_new_tokens did)."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stops = set(stop_ids(loaded))
    results = []
    for start in range(0, len(prompts), batch_size):
        for ids in _generate(loaded, prompts[start : start + batch_size], sampling):
            ended = next((i for i, token in enumerate(ids) if token in stops), None)
            kept = ids if ended is None else ids[:ended]
            results.append({
                "completion": loaded.tokenizer.decode(kept, skip_special_tokens=True),
                "tokens": len(kept),
                "finish": "length" if ended is None else "stop",
            })  # fmt: skip
        if on_batch is not None:
            on_batch(len(results), len(prompts))
    return results


def _generate(loaded: LoadedModel, chunk: list[list[int]], sampling: Sampling, streamer=None) -> list[list[int]]:
    """Left-padded prompts through model.generate (prompt methods add their virtual tokens in their hooks);
    an encoder-decoder reads them with its encoder and answers from the decoder start token."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, ids in enumerate(chunk):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        max_new_tokens=sampling.max_new_tokens,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=stop_ids(loaded),
        streamer=streamer,
        **sampling.options(),
    )
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    rows = output[:, 1:] if encoder_decoder else output[:, width:]
    return [row.tolist() for row in rows]
