"""Freeze tuning: train chosen transformer blocks (or parts of them) of the base model."""
