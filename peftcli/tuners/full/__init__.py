"""Full fine-tuning: train every parameter of the base model."""
