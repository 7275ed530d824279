"""OFT: orthogonal fine-tuning with block-diagonal rotations (see spec.py and layers.py)."""
