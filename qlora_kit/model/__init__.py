"""The model in memory: 4-bit loading, quantization, LoRA layers, adapters on disk."""
