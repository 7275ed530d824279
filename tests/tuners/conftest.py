"""Tuner tests run on one torch thread: the tiny models are far faster that way on a busy 2-core runner."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
