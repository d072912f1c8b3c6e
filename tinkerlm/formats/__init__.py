"""Checkpoint formats: GGUF, Hugging Face safetensors + config.json, and tokenizers, read into tensors and configs."""
