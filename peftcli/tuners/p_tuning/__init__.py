"""P-tuning: virtual-token embeddings produced by a small trainable encoder (MLP or LSTM)."""
