"""Base model and tokenizer loading."""
