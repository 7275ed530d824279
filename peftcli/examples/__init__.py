"""Example assets: a tiny random Llama for fast runs, and the real SmolLM2 + GSM8K from PyPI wheels."""
