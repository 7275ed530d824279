"""Training: one loop on accelerate.Accelerator for every method."""
