"""Merge an adapter into its base and export: plan, write, verify, resize."""
