"""BitFit: train only the biases of the base model."""
