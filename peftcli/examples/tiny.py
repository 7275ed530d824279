"""A tiny random Llama with a real byte-level BPE tokenizer and chat template, and a learnable toy task.

Everything is generated locally in well under a second, so tests and the tiny recipe need no download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue black white one two "
    "three four five six seven eight nine ten copy reverse count the a of and to is what answer question"
).split()


def toy_lines(count: int, seed: int = 0) -> list[str]:
    """Pseudo-sentences over a small vocabulary, for training the tokenizer."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # in a pipe its progress is blank lines
    )
    core.train_from_iterator(toy_lines(3000), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Modelled on Qwen3-style reasoning templates: an assistant message's "<think>...</think>" part is its reasoning;
# it is shown only for assistant turns after the last user message and dropped from earlier turns.
REASONING_CHAT_TEMPLATE = (
    "{%- set state = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set state.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set answer = m.content -%}{%- set thought = '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > state.last_user -%}{{- '<think>\\n' + thought + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- answer + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_reasoning_tokenizer():
    """The tiny tokenizer with a reasoning chat template, and <think> and </think> as whole (not special) tokens."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = REASONING_CHAT_TEMPLATE
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def build_llama(vocab_size: int, seed: int = 0, **overrides):
    """A Llama with random weights: hidden 64, 2 layers, 4 heads (2 KV heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        # A frozen random head with the usual std 0.02 caps logit margins near 1 at hidden size 64, so no
        # adapter could make the output sharp; a larger scale keeps the toy task learnable.
        initializer_range=0.2,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config))


def write_tiny_model(out_dir: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny Llama and its tokenizer as a normal Hugging Face directory."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer), seed=seed, **overrides)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


TINY_LABELS = ("negative", "neutral", "positive")


def build_bert(vocab_size: int, task: str = "seq_cls", num_labels: int = 3, seed: int = 0, **overrides):
    """A BERT encoder with random weights (hidden 64, 2 layers) and a seq_cls or token_cls head."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        num_labels=num_labels,
        initializer_range=0.2,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    cls = {"seq_cls": BertForSequenceClassification, "token_cls": BertForTokenClassification}[task]
    return cls(BertConfig(**config))


def build_t5(vocab_size: int, seed: int = 0, **overrides):
    """A T5 encoder-decoder with random weights: d_model 64, 2 + 2 layers, 4 heads."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = dict(
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        initializer_factor=1.0,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**config))


def write_tiny_encoder(out_dir: str | Path, task: str = "seq_cls", labels=TINY_LABELS, seed: int = 0) -> Path:
    """Save a tiny BERT classifier (seq_cls or token_cls) and the tiny tokenizer as an HF directory.

    The head is saved too, but training replaces it: the model builder sizes the head from the data's labels.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_bert(len(tokenizer), task=task, num_labels=len(labels), seed=seed)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tiny_seq2seq(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny T5 and the tiny tokenizer as an HF directory (pad doubles as the decoder start token)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_t5(len(tokenizer), seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.decoder_start_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def copy_task(count: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs a tiny model learns in a few dozen steps: repeat the words after 'copy'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS[:26]) for _ in range(rng.randint(2, 5))]
        rows.append({"prompt": "copy " + " ".join(words), "completion": " ".join(words)})
    return rows


COLORS = ("red", "green", "blue", "black", "white")
NUMBERS = ("one", "two", "three", "four", "five", "six")


def marker_classification_task(count: int, seed: int = 0) -> list[dict]:
    """Text/label rows whose label is given away by one marker word among random ones (a learnable toy)."""
    rng = random.Random(seed)
    markers = {"negative": "black", "neutral": "white", "positive": "red"}
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS[:26]) for _ in range(rng.randint(3, 6))]
        label = rng.choice(TINY_LABELS)
        words.insert(rng.randrange(len(words) + 1), markers[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def word_tagging_task(count: int, seed: int = 0) -> list[dict]:
    """Token-classification rows: each word tagged color, number or word (balanced between the three)."""
    rng = random.Random(seed)
    groups = {"word": WORDS[:26], "color": COLORS, "number": NUMBERS}
    rows = []
    for _ in range(count):
        tags = [rng.choice(list(groups)) for _ in range(rng.randint(3, 8))]
        rows.append({"tokens": [rng.choice(groups[t]) for t in tags], "tags": tags})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
