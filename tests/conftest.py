"""Shared fixtures: a tiny random Llama directory, toy data, and helpers to write recipes and run the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peftcli.examples.tiny import copy_task, write_jsonl, write_tiny_encoder, write_tiny_model, write_tiny_seq2seq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def tokenized_data_cache(tmp_path_factory) -> Path:
    """Tests fill a tokenized-data cache of their own (peftcli/data/cache.py), never the user's; subprocesses
    inherit it."""
    root = tmp_path_factory.mktemp("tokenized")
    os.environ["PEFTCLI_DATA_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a BPE tokenizer and chat template, saved as an HF dir."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT sequence classifier (hidden 64, 2 layers, 3 labels) with the tiny tokenizer."""
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert") / "model", task="seq_cls")


@pytest.fixture(scope="session")
def tiny_bert_token_dir(tmp_path_factory) -> Path:
    """A tiny random BERT token classifier (3 labels) with the tiny tokenizer."""
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-tok") / "model", task="token_cls")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A tiny random T5 (d_model 64, 2+2 layers) with the tiny tokenizer."""
    return write_tiny_seq2seq(tmp_path_factory.mktemp("tiny-t5") / "model")


@pytest.fixture(scope="session")
def copy_data(tmp_path_factory) -> Path:
    """400 prompt/completion rows of the toy copy task."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "copy.jsonl", copy_task(400))


@pytest.fixture
def one_torch_thread():
    """The tiny model is far faster on one thread: on a busy 2-core runner, thread contention costs 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def load_base(tiny_model_dir):
    """A function that returns a fresh fp32 copy of the tiny Llama, in eval mode."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    return load


@pytest.fixture
def input_ids(load_base):
    """Two sequences of 12 random token ids (seeded), within the tiny model's vocabulary."""
    vocab = load_base().config.vocab_size
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1234))
