"""Render one example of each data format into token ids and labels (-100 where no loss is taken).

Chat-style examples go through the tokenizer's own chat template. Which tokens belong to an assistant
turn is found on the rendered text (character offsets), then mapped to tokens, so the template's special
tokens around a turn are labelled exactly as the template places them.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import DataError
from peftcli.recipe.schema import FORMAT_COLUMNS, DataSource

IGNORE_INDEX = -100
ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class Renderer:
    """Turns rows of one source into {input_ids, labels} for a given tokenizer."""

    source: DataSource
    tokenizer: object
    mask_prompt: bool
    key: str  # recipe path of the source, for messages

    def column(self, field: str) -> str:
        return self.source.columns.get(field, field)

    def required_columns(self) -> list[str]:
        fields = [f for f in FORMAT_COLUMNS[self.source.format] if f != "input"]  # alpaca input is optional
        return [self.column(f) for f in fields]

    def check_columns(self, column_names: list[str]) -> None:
        missing = [c for c in self.required_columns() if c not in column_names]
        if missing:
            hint = ""
            if self.source.format in ("prompt_completion", "alpaca", "chat"):
                hint = f"; map them with {self.key}.columns, e.g. {{{FORMAT_COLUMNS[self.source.format][0]}: <column>}}"
            raise DataError(
                f"{self.key}: format {self.source.format} needs column(s) {', '.join(missing)}; "
                f"the data has {', '.join(column_names)}{hint}"
            )

    @property
    def uses_chat_template(self) -> bool:
        if self.source.format == "chat":
            return True
        if self.source.format == "text":
            return False
        style = self.source.prompt_style
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if style == "chat" and not has_template:
            raise DataError(f"{self.key}.prompt_style: chat, but the tokenizer has no chat template; use plain")
        return style == "chat" or (style == "auto" and has_template)

    def __call__(self, row: dict, index: int) -> dict:
        fmt = self.source.format
        if fmt == "chat":
            return self.render_chat(self.messages_of(row, index), index)
        if fmt == "text":
            return self.render_text(self.text_of(row, "text", index))
        if fmt == "alpaca":
            instruction = self.text_of(row, "instruction", index)
            extra = row.get(self.column("input")) or ""
            output = self.text_of(row, "output", index)
            if self.uses_chat_template:
                user = instruction if not extra else f"{instruction}\n\n{extra}"
                return self.render_chat(
                    [{"role": "user", "content": user}, {"role": "assistant", "content": output}], index
                )
            prompt = ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if extra else "",
                instruction=instruction,
                input_block=f"### Input:\n{extra}\n\n" if extra else "",
            )
            return self.render_plain(prompt, output)
        prompt, completion = self.text_of(row, "prompt", index), self.text_of(row, "completion", index)
        if self.uses_chat_template:
            return self.render_chat(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], index
            )
        return self.render_plain(prompt, completion)

    def text_of(self, row: dict, field: str, index: int) -> str:
        value = row.get(self.column(field))
        if not isinstance(value, str):
            raise DataError(
                f"{self.key}: example {index}: column {self.column(field)} should hold text, got {type(value).__name__}"
            )
        return value

    def messages_of(self, row: dict, index: int) -> list[dict]:
        messages = row.get(self.column("messages"))
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{self.key}: example {index}: {self.column('messages')} should be a non-empty list")
        clean = []
        for turn, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{self.key}: example {index}, message {turn}: needs role ({'/'.join(sorted(ROLES))}) "
                    "and text content"
                )
            clean.append({"role": message["role"], "content": message["content"]})
        if self.source.system_prompt and clean[0]["role"] != "system":
            clean.insert(0, {"role": "system", "content": self.source.system_prompt})
        return clean

    def render_chat(self, messages: list[dict], index: int) -> dict:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{self.key}: format chat needs a tokenizer with a chat template")
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError(
                    f"{self.key}: example {index}: the chat template does not render a conversation as a "
                    "prefix of its continuation, so assistant turns cannot be located; set data.mask_prompt: false"
                )
            spans.append((len(before), len(through)))
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        if not self.mask_prompt:
            return {"input_ids": ids, "labels": list(ids)}
        labels = []
        for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
            inside = any(lo <= start < hi for lo, hi in spans) and end > start
            labels.append(token_id if inside else IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels}

    def render_plain(self, prompt: str, completion: str) -> dict:
        tok = self.tokenizer
        prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        completion_ids = list(tok(completion, add_special_tokens=False)["input_ids"]) + self.eos()
        labels = ([IGNORE_INDEX] * len(prompt_ids) if self.mask_prompt else list(prompt_ids)) + completion_ids
        return {"input_ids": prompt_ids + completion_ids, "labels": labels}

    def render_text(self, text: str) -> dict:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) + self.eos()
        return {"input_ids": ids, "labels": list(ids)}

    def eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]


def truncate(example: dict, max_length: int) -> dict:
    """Cut an example to `max_length` tokens (from the right), noting whether anything was cut."""
    cut = len(example["input_ids"]) > max_length
    return {
        "input_ids": example["input_ids"][:max_length],
        "labels": example["labels"][:max_length],
        "truncated": cut,
    }
