"""The method registry. Each method lives in its own subpackage: `spec.py` (torch-free: params model,
capabilities, HF config mapping) registers it; `layers.py` holds the torch implementation, loaded lazily."""
