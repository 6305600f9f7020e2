"""Memory and offload-traffic planning from a model config."""
