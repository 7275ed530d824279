"""Prefix tuning: trainable keys and values in front of every attention layer."""
