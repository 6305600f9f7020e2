"""Merge an adapter into its base and export it, one step per module, each importing only those above it:
plan (headers -> what to write) -> weights (one merged tensor) -> write (shards, side files) -> verify (reload
and compare) -> report (merge_report.json, summary) -> pipeline (merge_and_export runs them); resize shrinks an
adapter's rank."""
