"""Helpers for tests and benchmarks: tiny models, memory measurement."""
