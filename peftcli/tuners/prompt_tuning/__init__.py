"""Prompt tuning: trainable virtual-token embeddings in front of the input."""
