"""Hugging Face PEFT's on-disk format: file names, the key prefix and task types.

Its own module, so method modules can name the format without importing `adapter.py`, which imports them.
"""

from __future__ import annotations

HF_KEY_PREFIX = "base_model.model."  # on-disk keys are the model's parameter names behind this prefix
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HF_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
TASKS_BY_HF_TYPE = {v: k for k, v in HF_TASK_TYPES.items()}
