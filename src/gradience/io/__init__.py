"""Low-level, torch-free readers for weight files (safetensors, validated and memory-mapped)."""
