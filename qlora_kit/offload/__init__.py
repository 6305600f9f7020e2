"""Keeping the frozen 4-bit base out of RAM: memory-mapped or streamed."""
