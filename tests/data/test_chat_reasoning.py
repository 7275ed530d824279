"""Chat templates of reasoning models: which tokens of a conversation with <think> blocks are trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.data.formats import IGNORE_INDEX, Renderer
from peftcli.errors import DataError
from peftcli.examples.tiny import build_reasoning_tokenizer, build_tokenizer
from peftcli.recipe.schema import DataSource

CONVERSATION = [
    {"role": "user", "content": "copy alpha"},
    {"role": "assistant", "content": "<think>\nthe word is alpha\n</think>\n\nalpha"},
    {"role": "user", "content": "count one"},
    {"role": "assistant", "content": "<think>\nafter one comes two\n</think>\n\none two"},
]


@pytest.fixture(scope="module")
def reasoning_tokenizer():
    return build_reasoning_tokenizer()  # a Qwen3-style template: earlier turns lose their <think> block


def _chat(tokenizer, data: Path, mask_prompt: bool = True) -> Renderer:
    return Renderer(DataSource(path=str(data), format="chat"), tokenizer, mask_prompt, "data.train")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_reasoning_template_trains_the_last_turn_with_its_think_block(reasoning_tokenizer, copy_data: Path) -> None:
    tok = reasoning_tokenizer
    example = _chat(tok, copy_data)({"messages": CONVERSATION}, 0)

    # The template drops turn 1's reasoning once a user turn follows: the model reads "alpha" in the context of
    # turn 2, but never generates it that way (when it was the last turn it thought first). Training that text
    # would teach answering without thinking, so turn 1 is context; turn 2 is trained from its <think> through
    # its end-of-turn tokens, and no header is.
    pieces = [
        ("<|im_start|>user\ncopy alpha<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("alpha<|im_end|>\n", False),
        ("<|im_start|>user\ncount one<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("<think>\nafter one comes two\n</think>\n\none two<|im_end|>\n", True),
    ]
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == "".join(piece for piece, _ in pieces)  # the template really rewrote turn 1
    expected_ids = [t for piece, _ in pieces for t in _ids(tok, piece)]
    expected_labels = [t if trained else IGNORE_INDEX for piece, trained in pieces for t in _ids(tok, piece)]
    assert example["input_ids"] == _ids(tok, text) == expected_ids
    assert example["labels"] == expected_labels

    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert trained.count(think) == 1 and trained.count(end_think) == 1 and trained[0] == think
    assert tok.decode(trained) == "<think>\nafter one comes two\n</think>\n\none two<|im_end|>\n"


def test_reasoning_template_single_turn_and_a_conversation_ending_with_a_user(
    reasoning_tokenizer, copy_data: Path
) -> None:
    tok, render = reasoning_tokenizer, _chat(reasoning_tokenizer, copy_data)
    one = render({"messages": CONVERSATION[:2]}, 0)
    trained = [t for t in one["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "<think>\nthe word is alpha\n</think>\n\nalpha<|im_end|>\n"
    # An assistant turn followed only by a user turn is rewritten too: nothing is left to train.
    assert all(t == IGNORE_INDEX for t in render({"messages": CONVERSATION[:3]}, 0)["labels"])
    # Without mask_prompt every token trains, the rewritten turn included (as rendered).
    plain = _chat(tok, copy_data, mask_prompt=False)({"messages": CONVERSATION}, 0)
    assert plain["labels"] == plain["input_ids"]


def test_a_template_that_rewrites_what_comes_before_a_turn_is_still_refused(copy_data: Path) -> None:
    tok = build_tokenizer()
    # Counts the messages first: no render is a prefix of a longer one, so no turn can be located.
    tok.chat_template = "{{ messages | length }}\n" + tok.chat_template
    with pytest.raises(DataError, match="example 4: the chat template does not render a conversation as a prefix"):
        _chat(tok, copy_data)({"messages": CONVERSATION}, 4)
