"""Generation and evaluation with zero, one or several adapters."""
