"""Bottleneck adapters (Houlsby, Pfeiffer)."""
