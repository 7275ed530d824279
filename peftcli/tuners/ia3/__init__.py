"""IA3: learned rescaling vectors."""
