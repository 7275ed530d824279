"""VeRA: shared random projections with trainable scaling vectors (see spec.py and layers.py)."""
