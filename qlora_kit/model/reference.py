"""The DPO reference as a frozen copy of the starting adapter, on the same model (no second model).

``freeze_reference`` copies adapter "default" into adapter "reference" whose A/B are non-persistent buffers;
``reference(model)`` runs the model with that copy in place of the trainable adapter, or with every adapter
disabled (the bare 4-bit base) when there is no copy.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qlora_kit.config import ConfigError
from qlora_kit.model.lora import LoraAdapter, adapters_active, adapters_disabled, lora_layers

REFERENCE = "reference"  # the name of the frozen copy ``freeze_reference`` makes


def freeze_reference(model: nn.Module, source: str = "default", name: str = REFERENCE) -> int:
    """Add adapter ``name``: a frozen copy of adapter ``source`` as it is now, for a DPO reference.

    The copy's A/B are non-persistent buffers (not parameters: never trained, never in a state dict or adapter
    file), at ``source``'s current rank and without dropout, so it is deterministic. ``reference(model)`` runs
    the model with it. Returns the number of layers copied. Raises ConfigError when ``source`` has
    ``modules_to_save`` copies (a frozen copy of those is not supported) and KeyError when it is not loaded.
    """
    config = getattr(model, "lora_configs", {}).get(source)
    if config is None:
        raise KeyError(f"no adapter named {source!r} to copy; loaded adapters: {sorted(getattr(model, 'lora_configs', {}))}")
    if config.modules_to_save:
        raise ConfigError(f"training.dpo_reference=adapter: the starting adapter trains modules_to_save "
                          f"{config.modules_to_save}, whose frozen copy is not supported; use dpo_reference=base")
    frozen = dataclasses.replace(config, dropout=0.0)
    copied = 0
    for _, layer in lora_layers(model):
        if source not in layer.adapters:
            continue
        src = layer.adapters[source]
        copy = LoraAdapter(layer.in_features, layer.out_features, frozen, src.lora_A.dtype, trainable=False)
        with torch.no_grad():
            copy.lora_A.copy_(src.lora_A)
            copy.lora_B.copy_(src.lora_B)
        copy.rank = src.rank
        layer.adapters[name] = copy.to(src.lora_A.device)
        copied += 1
    model.lora_configs = {**model.lora_configs, name: frozen}
    return copied


def reference(model: nn.Module):
    """A context manager running the DPO reference: the frozen copy ``freeze_reference`` made if there is one,
    else the bare base (``adapters_disabled``)."""
    if REFERENCE in getattr(model, "lora_configs", {}):
        return adapters_active(model, [REFERENCE])
    return adapters_disabled(model)
