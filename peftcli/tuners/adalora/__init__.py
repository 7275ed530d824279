"""AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training (see spec.py and layers.py)."""
