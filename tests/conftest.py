"""Shared fixtures: tiny random Llama checkpoints built locally, and the real demo model when marked."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64) with a BPE tokenizer and a chat template, in fp32 safetensors."""
    from qlora_kit.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real SmolLM2-135M-Instruct, converted once and cached (only for tests marked real_model)."""
    from qlora_kit.demo import demo_model_path

    return demo_model_path()


def load_tiny(path, **kwargs):
    """Load the tiny model in 4-bit NF4 with fp32 compute (deterministic and exact on any CPU)."""
    from qlora_kit import load_model

    kwargs.setdefault("compute_dtype", "fp32")
    kwargs.setdefault("device", "cpu")
    return load_model(path, **kwargs)
