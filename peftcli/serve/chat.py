"""A multi-turn conversation with a loaded run, through its tokenizer's chat template."""

from __future__ import annotations

from peftcli.errors import PeftCliError
from peftcli.serve.generate import Sampling, chat_ids, check_generative, generate_ids, stop_ids
from peftcli.serve.load import LoadedModel


class ChatSession:
    """The conversation so far; each answer is generated from the whole of it."""

    def __init__(self, loaded: LoadedModel, system: str | None, sampling: Sampling):
        check_generative(loaded, "chat")
        if loaded.task == "seq2seq":
            raise PeftCliError(
                f"{loaded.source}: a seq2seq model reads its prompt as plain text, not a conversation; use peft "
                "generate RUN --prompt TEXT"
            )
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise PeftCliError(
                f"{loaded.source}: the tokenizer has no chat template, so there is no conversation format to "
                "chat in; use peft generate RUN --prompt TEXT for single prompts"
            )
        self.loaded, self.system, self.sampling = loaded, system, sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_text(self, user: str) -> str:
        """What the model reads before answering `user`: the whole conversation through the template."""
        messages = [*self.messages, {"role": "user", "content": user}]
        return self.loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def answer(self, user: str, streamer=None) -> str:
        """Add the user's turn, generate the assistant's (streamed if asked), keep both; returns the answer."""
        messages = [*self.messages, {"role": "user", "content": user}]
        ids = generate_ids(self.loaded, chat_ids(self.loaded.tokenizer, messages), self.sampling, streamer)
        stops = set(stop_ids(self.loaded))
        ended = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        text = self.loaded.tokenizer.decode(ids[:ended], skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": text}]
        return text
