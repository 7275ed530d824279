"""LoKr: Kronecker product updates."""
