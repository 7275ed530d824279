"""The tokenizer of a GGUF file: what llama.cpp needs to tokenize exactly as the Hugging Face tokenizer does.

Two kinds are written from `tokenizer.json`: byte-level BPE (GPT-2, SmolLM, Llama-3, Qwen2 style; llama.cpp's
"gpt2" model with the pre-tokenizer named) and SentencePiece-style BPE with byte fallback (Gemma; llama.cpp's
"llama" model, whose merge order comes from per-token scores, derived here from the merge ranks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from peftcli.errors import PeftCliError

# The Qwen2 family's pre-tokenizer split, as its tokenizer.json states it (llama.cpp's "qwen2" splitter).
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _pre_tokenizer_name(tokenizer: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json, for the shapes whose splitting it reproduces."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict) -> bool:
        # GPT-2's split regex, without a leading space added: what llama.cpp's "gpt-2" splitter does
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if len(steps) == 1 and byte_level(steps[0]):
        return "gpt-2"
    if len(steps) == 2 and _is_qwen2_split(steps[0]) and steps[1].get("type") == "ByteLevel":
        return "qwen2" if not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space") else None
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        return "smollm" if byte_level(steps[1]) else None  # each digit alone, then the GPT-2 regex
    return None


def _is_qwen2_split(step: dict) -> bool:
    pattern = step.get("pattern") or {}
    return (
        step.get("type") == "Split"
        and pattern.get("Regex") == QWEN2_SPLIT
        and step.get("behavior") == "Isolated"
        and not step.get("invert")
    )


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    """Vocabulary, merges or scores, special tokens and chat template from `model_dir`'s tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise PeftCliError(f"{model_dir} has no tokenizer.json; gguf export needs a fast (tokenizers) tokenizer")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and _is_sentencepiece_style(tokenizer):
        _add_sentencepiece_style(writer, path, tokenizer, n_vocab)
        load_merges = False  # the scores carry the merge order
    else:
        _add_byte_level(writer, path, tokenizer, n_vocab)
        load_merges = True
    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    if load_merges and not special.merges:
        raise PeftCliError(f"{path} has no BPE merges")
    special.add_special_token.update(_adds_bos_eos(model_dir))
    special.add_to_gguf(writer, quiet=True)


def _token_table(path: Path, tokenizer: dict, n_vocab: int, kind_of) -> tuple[list[str], list[gguf.TokenType]]:
    """Every token's text and llama.cpp type by id; `kind_of(text)` types the model's own tokens."""
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(text, i, kind_of(text)) for text, i in tokenizer["model"]["vocab"].items()]
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        entries.append((added["content"], added["id"], kind))
    for text, i, kind in entries:
        if i >= n_vocab:
            raise PeftCliError(f"{path} has token id {i} but the model's embedding has only {n_vocab} rows")
        tokens[i], types[i] = text, kind
    # Embedding rows past the tokenizer (padding to a round size) get placeholder names llama.cpp never produces.
    return [text if text is not None else f"[PAD{i}]" for i, text in enumerate(tokens)], types


def _add_byte_level(writer: gguf.GGUFWriter, path: Path, tokenizer: dict, n_vocab: int) -> None:
    """A byte-level BPE tokenizer (llama.cpp "gpt2"): tokens and the named pre-tokenizer; merges come after."""
    model = tokenizer.get("model") or {}
    pre = _pre_tokenizer_name(tokenizer)
    # Qwen2's tokenizers normalize to NFC, which llama.cpp's qwen2 vocabulary takes as it is (its converter too).
    normalizer = tokenizer.get("normalizer")
    plain = normalizer is None or (pre == "qwen2" and normalizer == {"type": "NFC"})
    if model.get("type") != "BPE" or model.get("byte_fallback") or not plain or pre is None:
        raise PeftCliError(
            f"gguf export handles byte-level BPE tokenizers (GPT-2, SmolLM or Qwen2 style) and SentencePiece-style "
            f"BPE with byte fallback (Gemma style); {path} is a different kind"
        )
    tokens, types = _token_table(path, tokenizer, n_vocab, lambda text: gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _is_sentencepiece_style(tokenizer: dict) -> bool:
    """Gemma's layout: spaces become the visible space by the normalizer and nothing else splits the text."""
    normalizer = tokenizer.get("normalizer") or {}
    pre = tokenizer.get("pre_tokenizer")
    replaces_spaces = (
        normalizer.get("type") == "Replace"
        and (normalizer.get("pattern") or {}).get("String") == " "
        and normalizer.get("content") == SPACE
    )
    # Gemma's Split on " " finds no space left after the normalizer: it changes nothing
    harmless_pre = pre is None or (
        pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " " and not pre.get("invert")
    )
    return replaces_spaces and harmless_pre


def _merge_scores(tokenizer: dict) -> dict[str, float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest; HF merges
    the pair ranked first. A token's score is minus the rank of the first merge that makes it."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tokenizer["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _add_sentencepiece_style(writer: gguf.GGUFWriter, path: Path, tokenizer: dict, n_vocab: int) -> None:
    """A SentencePiece-style BPE tokenizer with byte fallback (llama.cpp "llama"): tokens, scores and types."""
    scores = _merge_scores(tokenizer)
    unk = tokenizer["model"].get("unk_token")

    def kind_of(text: str) -> gguf.TokenType:
        if _BYTE_TOKEN.fullmatch(text):
            return gguf.TokenType.BYTE
        return gguf.TokenType.UNKNOWN if text == unk else gguf.TokenType.NORMAL

    tokens, types = _token_table(path, tokenizer, n_vocab, kind_of)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    # Tokens no merge makes (single characters, bytes, control tokens) are never the result of a merge.
    writer.add_token_scores([scores.get(text, 0.0) for text in tokens])
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)  # the normalizer only replaces spaces; nothing is put in front


def _adds_bos_eos(model_dir: Path) -> dict[str, bool]:
    """Whether the HF tokenizer adds BOS / EOS around plain text: measured, since configs state it many ways."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    plain, full = tok.encode("Hello", add_special_tokens=False), tok.encode("Hello")
    extra = len(full) > len(plain)
    return {
        "bos": extra and tok.bos_token_id is not None and full[0] == tok.bos_token_id,
        "eos": extra and tok.eos_token_id is not None and full[-1] == tok.eos_token_id,
    }
