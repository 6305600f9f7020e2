"""Shared fixtures: tiny random Llama checkpoints built locally, and the real demo model when marked."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Training picks its thread count by the machine's load (hardware.choose_cpu_threads); tests that compare two
# runs bit for bit need the same count in every run and subprocess, whatever else the machine is doing.
os.environ.setdefault("QLORA_KIT_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64) with a BPE tokenizer and a chat template, in fp32 safetensors."""
    from qlora_kit.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real SmolLM2-135M-Instruct, converted once and cached (only for tests marked real_model)."""
    from qlora_kit.demo.model import demo_model_path

    return demo_model_path()


def load_tiny(path, **kwargs):
    """Load the tiny model in 4-bit NF4 with fp32 compute (deterministic and exact on any CPU)."""
    from qlora_kit import load_model

    kwargs.setdefault("compute_dtype", "fp32")
    kwargs.setdefault("device", "cpu")
    return load_model(path, **kwargs)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A rank-4 adapter on all linear layers of the tiny model, with random (non-zero) B, saved by qlora-kit."""
    from qlora_kit import LoraConfig, add_lora, save_adapter
    from qlora_kit.model.lora import lora_layers

    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.copy_(torch.randn(layer.adapters["default"].lora_B.shape, generator=g))
    return save_adapter(model, tmp_path_factory.mktemp("tiny-adapter") / "adapter")


@pytest.fixture(scope="session")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A rank-4 adapter on q/v/up of the tiny model with small random B (an "SFT adapter" to start DPO from)."""
    from qlora_kit import LoraConfig, add_lora, save_adapter
    from qlora_kit.model.lora import lora_layers

    model, _ = load_tiny(tiny_model_dir)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.05)
    return save_adapter(model, tmp_path_factory.mktemp("sft") / "adapter")
