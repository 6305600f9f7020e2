"""The demo model, task and run."""
