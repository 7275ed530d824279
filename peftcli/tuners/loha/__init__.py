"""LoHa: Hadamard product of low-rank updates."""
