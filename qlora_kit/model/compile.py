"""``torch.compile`` of the decoder layers for training, and an eager switch for everything else.

Inductor fuses what runs between the matmuls of a decoder layer (RMSNorm's fp32 round trip, RoPE, SiLU times
the up projection, residual adds, the casts around them) into a few C++/Triton kernels. Measured on the
demo model (hidden 576) with one thread of an AVX512-BF16 CPU (``scripts/bench_train.py --runs
ours,ours-compiled``): 1.10-1.15x the eager steps, after compiling for 20-70 s (one graph for padded and one for
unpadded batches; shapes are dynamic, so new lengths don't recompile). On the ~1B shape (hidden 2048), where
GEMMs take 78 % of a step, no gain was measured, so it is opt-in (``training.compile: on``). Everything but the training step (evaluation, generation) runs eagerly inside ``eager()``.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger("qlora_kit")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class transformers lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: nn.Module) -> list[nn.Module]:
    """Wrap the decoder layers' forward in ``torch.compile`` (inductor, dynamic shapes); returns those layers.

    The first layer stays eager: its input, the frozen embeddings' output, needs no gradient, unlike every
    other layer's, and would cost a second compilation of the same graph. Compilation itself happens on the
    first forward. The weights stay where they are: only the call changes.
    """
    layers = decoder_layers(model)[1:]
    for layer in layers:
        layer.compile(dynamic=True)
    return layers


@contextlib.contextmanager
def compiled_for_training(model: nn.Module, enabled: bool):
    """Inside the block the decoder layers run compiled (when ``enabled``); on exit they are plain modules again,
    so a model passed in by the caller is handed back as it came."""
    layers = []
    if enabled:
        layers = compile_layers(model)
        log.info("torch.compile: %d decoder layers; the first steps compile them (about a minute on a CPU, one "
                 "graph for padded and one for unpadded batches)", len(layers))
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager __call__


def eager():
    """A context in which compiled layers run their original Python forward (no compilation, no recompile)."""
    return torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
