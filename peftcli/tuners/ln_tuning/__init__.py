"""LayerNorm tuning: train a copy of each normalisation layer."""
