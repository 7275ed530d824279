"""Render one example of each data format into token ids and labels (-100 where no loss is taken).

What an example becomes depends on the task (the batch contract is written down in data/collate.py):

- causal_lm: chat-style examples go through the tokenizer's own chat template. Which tokens belong to an
  assistant turn is found on the rendered text (character offsets), then mapped to tokens, so the template's
  special tokens around a turn are labelled exactly as the template places them.
- seq2seq: the prompt is the encoder input, as plain text with the tokenizer's special tokens (no chat
  template: encoder-decoder models are not trained on one); the completion plus eos is the decoder target.
  alpaca: the instruction, then a blank line and the input when there is one. chat: the target is the last
  assistant turn and the encoder reads the turns before it, one paragraph each; when the context holds more
  than one non-system turn each paragraph starts with its role ("user: ...") so the speakers stay apart.
- seq_cls: the text (and text_pair, for pair tasks) with the tokenizer's special tokens; the label is one id.
- token_cls: the words are tokenized as pre-split words; each word's label sits on its first sub-token, and
  other sub-tokens and special tokens get -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from peftcli.errors import DataError
from peftcli.recipe.schema import FORMAT_COLUMNS, OPTIONAL_COLUMNS, DataSource

IGNORE_INDEX = -100
ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def label_name(value) -> str:
    """The name a label value is known by: text as it is, whole numbers in decimal (1.0 reads as 1)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def sorted_label_names(values) -> list[str]:
    """Distinct label names in id order: numerically when every label is a whole number, else alphabetically."""
    names = {label_name(v) for v in values}
    if all(re.fullmatch(r"-?[0-9]+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


@dataclass
class Renderer:
    """Turns rows of one source into {input_ids, labels, ...} for a given tokenizer and task."""

    source: DataSource
    tokenizer: object
    mask_prompt: bool
    key: str  # recipe path of the source, for messages
    task: str = "causal_lm"
    label_ids: dict[str, int] | None = None  # label name -> id, for seq_cls and token_cls
    max_length: int | None = None  # seq_cls and token_cls truncate while tokenizing (keeping [SEP] and pairs)
    labels_from: str = "data.labels"  # where label_ids came from, for messages

    def column(self, field: str) -> str:
        return self.source.columns.get(field, field)

    def required_columns(self) -> list[str]:
        # alpaca's input and classification's text_pair are optional, unless mapped to a column by name
        fields = [
            f
            for f in FORMAT_COLUMNS[self.source.format]
            if f not in OPTIONAL_COLUMNS.get(self.source.format, ()) or f in self.source.columns
        ]
        return [self.column(f) for f in fields]

    def check_columns(self, column_names: list[str]) -> None:
        missing = [c for c in self.required_columns() if c not in column_names]
        if missing:
            hint = ""
            if self.source.format != "text":
                hint = f"; map them with {self.key}.columns, e.g. {{{FORMAT_COLUMNS[self.source.format][0]}: <column>}}"
            raise DataError(
                f"{self.key}: format {self.source.format} needs column(s) {', '.join(missing)}; "
                f"the data has {', '.join(column_names)}{hint}"
            )

    @property
    def uses_chat_template(self) -> bool:
        if self.task == "seq2seq":
            return False
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
        if fmt == "preference":
            return self.render_preference(row, index)
        if fmt == "unpaired_preference":
            raise ValueError("unpaired examples are rendered with render_unpaired: each needs another's completion")
        if fmt == "classification":
            return self.render_classification(row, index)
        if fmt == "token_classification":
            return self.render_token_classification(row, index)
        if self.task == "seq2seq":
            return self.render_seq2seq(row, index)
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
                    self.with_system([{"role": "user", "content": user}, {"role": "assistant", "content": output}]),
                    index,
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
                self.with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]),
                index,
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
        where = f"{self.key}: example {index}: {self.column('messages')}"
        return self.with_system(self.clean_messages(row.get(self.column("messages")), where))

    def with_system(self, messages: list[dict]) -> list[dict]:
        """data.train.system_prompt first, unless the example brings its own system message."""
        if self.source.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.source.system_prompt}, *messages]
        return messages

    def render_chat(self, messages: list[dict], index: int, first_labelled_turn: int = 0) -> dict:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{self.key}: format chat needs a tokenizer with a chat template")
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < first_labelled_turn:
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if i < len(messages) - 1 and text.startswith(before) and not text.startswith(through):
                # Rewritten once the conversation goes on (reasoning templates drop an earlier turn's <think>
                # block): that text is not what the model generates, so the turn stays context, unlabelled.
                continue
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

    # preference pairs

    def render_preference(self, row: dict, index: int) -> dict:
        """A pair as one example: the chosen side as input_ids/labels (so it reads like an SFT example) and the
        rejected side as rejected_input_ids/rejected_labels. Each side is rendered as SFT data would be, with
        labels on its completion only; a long side loses prompt tokens from the left first."""
        prompt = row.get(self.column("prompt"))
        chosen, rejected = row.get(self.column("chosen")), row.get(self.column("rejected"))
        masked = replace(self, mask_prompt=True)  # a pair's loss is on its completions, whatever mask_prompt says
        sides = []
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            messages = self.pair_side(prompt, completion, name, index)
            if messages is None:
                sides.append(masked.render_plain(prompt, completion))
            else:
                sides.append(masked.render_chat(messages, index, first_labelled_turn=len(messages) - 1))
        if sides[0]["input_ids"] == sides[1]["input_ids"]:
            raise DataError(f"{self.key}: example {index}: chosen and rejected are the same; drop the pair")
        (good, good_cut), (bad, bad_cut) = (self.fit(side) for side in sides)
        return {
            "input_ids": good["input_ids"],
            "labels": good["labels"],
            "rejected_input_ids": bad["input_ids"],
            "rejected_labels": bad["labels"],
            "truncated": good_cut or bad_cut,
        }

    # unpaired preference examples (kto)

    def render_unpaired(self, row: dict, index: int, other: tuple[int, object]) -> dict:
        """An example labelled desirable or undesirable, rendered as SFT data is (labels on the completion
        only, prompt tokens cut from the left first), and its mismatched row: the same prompt with the completion
        of example `other` = (index, completion), which the kl estimate scores (see objectives/kto_loss.py)."""
        where = f"{self.key}: example {index}"
        prompt = row.get(self.column("prompt"))
        if prompt is None or prompt == "" or prompt == []:
            raise DataError(f"{where}: column {self.column('prompt')} is empty; every unpaired example needs a prompt")
        desirable = self.desirable(row.get(self.column("label")), index)
        masked = replace(self, mask_prompt=True)  # the loss is on the completion, whatever mask_prompt says
        rows = []
        for at, completion in ((index, row.get(self.column("completion"))), other):
            if completion is None or completion == "" or completion == []:
                raise DataError(f"{self.key}: example {at}: column {self.column('completion')} is empty")
            if isinstance(completion, list):  # checked on its own, so a fault is reported with its own example
                self.clean_messages(completion, f"{self.key}: example {at}: {self.column('completion')}")
            if isinstance(completion, list) and (len(completion) != 1 or completion[0].get("role") != "assistant"):
                raise DataError(
                    f"{self.key}: example {at}: {self.column('completion')} should be one assistant message (or text)"
                )
            if not isinstance(completion, (str, list)):
                raise DataError(
                    f"{self.key}: example {at}: column {self.column('completion')} should hold text or one "
                    "assistant message"
                )
            messages = self.pair_side(prompt, completion, "completion", index)
            if messages is None:
                rows.append(masked.render_plain(prompt, completion))
            else:
                rows.append(masked.render_chat(messages, index, first_labelled_turn=len(messages) - 1))
        (matched, matched_cut), (mismatched, mismatched_cut) = (self.fit(r) for r in rows)
        return {
            "input_ids": matched["input_ids"],
            "labels": matched["labels"],
            "mismatched_input_ids": mismatched["input_ids"],
            "mismatched_labels": mismatched["labels"],
            "desirable": desirable,
            "truncated": matched_cut or mismatched_cut,
        }

    def desirable(self, value, index: int) -> bool:
        """An unpaired example's label: true/false, also written 1/0 or as the text "true"/"false"."""
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        shown = "empty" if value is None else repr(value)
        raise DataError(
            f"{self.key}: example {index}: column {self.column('label')} is {shown}; it should say whether the "
            "completion is desirable: true or false (also 1 or 0)"
        )

    def pair_side(self, prompt, completion, name: str, index: int) -> list[dict] | None:
        """The messages of one side of a pair (None: plain text, rendered without a chat template).

        Text prompt and completion use the chat template when the source does (prompt_style); a list of
        messages for the prompt, or a completion that is a list of messages, always does. Without a prompt,
        chosen and rejected are whole conversations; their differing last assistant turn is the completion.
        """
        where = f"{self.key}: example {index}"
        if isinstance(completion, list):
            turns = self.clean_messages(completion, f"{where}: {self.column(name)}")
            if prompt is None or prompt == "" or prompt == []:
                if len(turns) < 2 or turns[-1]["role"] != "assistant":
                    raise DataError(
                        f"{where}: without a prompt, {self.column(name)} must be a conversation ending in an "
                        "assistant turn"
                    )
                return turns
            if turns[0]["role"] != "assistant" or len(turns) != 1:
                raise DataError(f"{where}: {self.column(name)} should be one assistant message (or text)")
            return self.prompt_messages(prompt, where) + turns
        if not isinstance(completion, str):
            raise DataError(f"{where}: column {self.column(name)} should hold text or a list of messages")
        if isinstance(prompt, list):
            return self.prompt_messages(prompt, where) + [{"role": "assistant", "content": completion}]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: column {self.column('prompt')} should hold text or a list of messages")
        if self.uses_chat_template:
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return None

    def prompt_messages(self, prompt, where: str) -> list[dict]:
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        else:
            turns = self.clean_messages(prompt, f"{where}: {self.column('prompt')}")
        if self.source.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.source.system_prompt})
        return turns

    def clean_messages(self, messages, where: str) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} should be a non-empty list of messages")
        for turn, message in enumerate(messages):
            role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (0, 0)
            if role not in ROLES or not isinstance(content, str):
                raise DataError(f"{where}, message {turn}: needs role ({'/'.join(sorted(ROLES))}) and text content")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def fit(self, side: dict) -> tuple[dict, bool]:
        """One side cut to max_length: prompt tokens go first, from the left (keeping the one the first
        completion token is predicted from); only a completion longer than max_length loses its end."""
        ids, labels, limit = side["input_ids"], side["labels"], self.max_length
        if limit is None or len(ids) <= limit:
            return side, False
        first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        start = min(len(ids) - limit, max(0, first - 1))
        return {"input_ids": ids[start:][:limit], "labels": labels[start:][:limit]}, True

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

    # seq2seq

    def render_seq2seq(self, row: dict, index: int) -> dict:
        fmt = self.source.format
        if fmt == "chat":
            prompt, completion = self.chat_as_prompt(self.messages_of(row, index))
        elif fmt == "alpaca":
            extra = row.get(self.column("input")) or ""
            instruction = self.text_of(row, "instruction", index)
            prompt = instruction if not extra else f"{instruction}\n\n{extra}"
            completion = self.text_of(row, "output", index)
        else:
            prompt, completion = self.text_of(row, "prompt", index), self.text_of(row, "completion", index)
        tok = self.tokenizer
        input_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        if completion is None:
            return {"input_ids": input_ids, "labels": []}  # no assistant turn: dropped for having no labels
        labels = list(tok(text_target=completion)["input_ids"])  # the target's own special tokens (T5: eos)
        eos = self.eos()
        if eos and labels[-1:] != eos:
            labels += eos
        return {"input_ids": input_ids, "labels": labels}

    @staticmethod
    def chat_as_prompt(messages: list[dict]) -> tuple[str, str | None]:
        """The encoder text (turns before the last assistant turn) and that turn's content as the target."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        context = messages if last is None else messages[:last]
        spoken = [m for m in context if m["role"] != "system"]
        named = len(spoken) > 1
        paragraphs = [
            m["content"] if m["role"] == "system" or not named else f"{m['role']}: {m['content']}" for m in context
        ]
        return "\n\n".join(paragraphs), None if last is None else messages[last]["content"]

    # classification

    def label_id(self, value, index: int, field: str) -> int:
        if value is None:
            raise DataError(f"{self.key}: {self.source.path}: example {index}: column {self.column(field)} is empty")
        name = label_name(value)
        ids = self.label_ids or {}
        if name not in ids:
            known = list(ids)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise DataError(
                f"{self.key}: {self.source.path}: example {index}: label {name!r} is not one of the labels "
                f"({shown}, from {self.labels_from}); fix the data or list every label in data.labels"
            )
        return ids[name]

    def encode(self, *args, **kwargs) -> tuple[dict, bool]:
        """The tokenizer's encoding with its special tokens, truncated to max_length; and whether it was cut."""
        tok = self.tokenizer
        encoded = tok(*args, **kwargs)
        if self.max_length is None or len(encoded["input_ids"]) <= self.max_length:
            return encoded, False
        return tok(*args, truncation=True, max_length=self.max_length, **kwargs), True

    def with_token_types(self, example: dict, encoded) -> dict:
        if "token_type_ids" in encoded:  # BERT-style pair inputs tell the two texts apart by these
            example["token_type_ids"] = list(encoded["token_type_ids"])
        return example

    def render_classification(self, row: dict, index: int) -> dict:
        text = self.text_of(row, "text", index)
        pair_column = self.column("text_pair")
        pair = self.text_of(row, "text_pair", index) if pair_column in row else None
        encoded, cut = self.encode(text, pair) if pair is not None else self.encode(text)
        label = self.label_id(row.get(self.column("label")), index, "label")
        example = {"input_ids": list(encoded["input_ids"]), "labels": label, "truncated": cut}
        return self.with_token_types(example, encoded)

    def render_token_classification(self, row: dict, index: int) -> dict:
        words, tags = row.get(self.column("tokens")), row.get(self.column("tags"))
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(
                f"{self.key}: example {index}: column {self.column('tokens')} should be a list of words (text)"
            )
        if not isinstance(tags, list) or len(tags) != len(words):
            given = f"{len(tags)} tags" if isinstance(tags, list) else type(tags).__name__
            raise DataError(
                f"{self.key}: example {index}: column {self.column('tags')} should hold one label per word "
                f"({len(words)} words, got {given})"
            )
        try:
            encoded, cut = self.encode(words, is_split_into_words=True)
            word_ids = encoded.word_ids()
        except (ValueError, TypeError, AssertionError) as exc:  # slow tokenizers, or byte-level ones without prefix
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"{self.key}: format token_classification needs a fast tokenizer that takes pre-split words: {text}"
            ) from None
        labels, previous = [], None
        for word in word_ids:
            first = word is not None and word != previous
            labels.append(self.label_id(tags[word], index, "tags") if first else IGNORE_INDEX)
            previous = word
        example = {"input_ids": list(encoded["input_ids"]), "labels": labels, "truncated": cut}
        return self.with_token_types(example, encoded)


def truncate(example: dict, max_length: int) -> dict:
    """Cut every token sequence of an example (inputs, and labels unless one per example) to `max_length`.

    Sequences are cut from the right; `truncated` says whether anything was cut, here or while tokenizing.
    """
    result = {}
    cut = bool(example.get("truncated", False))
    for name, value in example.items():
        if name == "truncated":
            continue
        if isinstance(value, list):
            cut = cut or len(value) > max_length
            value = value[:max_length]
        result[name] = value
    result["truncated"] = cut
    return result
