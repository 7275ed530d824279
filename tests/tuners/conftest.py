"""Fixtures for the tuner tests: fresh fp32 copies of the tiny Llama and a fixed batch of token ids."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
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
