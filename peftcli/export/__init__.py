"""Export trained models to other formats (GGUF for llama.cpp)."""
