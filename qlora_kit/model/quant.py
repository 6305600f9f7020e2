"""Quantize and dequantize single weights with bitsandbytes, exactly as the 4-bit loader does."""
from __future__ import annotations

import torch
from torch import nn

from qlora_kit.config import QuantConfig

# The 16 NF4 levels as bitsandbytes codes them (quantiles of N(0, 1), rescaled to [-1, 1]; QLoRA, App. E).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (its weight carries a quant_state)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def is_8bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes Linear8bitLt."""
    return type(layer).__name__ == "Linear8bitLt"


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(param, "quant_state", None)
    return int(state.shape.numel()) if state is not None else param.numel()


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a linear layer computes with, as fp32 ``[out, in]``: dequantized for 4- and 8-bit layers."""
    weight = layer.weight
    if is_4bit(layer):
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state).float()  # [out, in]
    if is_8bit(layer):
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(layer.state, "SCB", None)
        if scb is None:  # not yet quantized (still on the host before .to(device))
            return weight.data.float()
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)  # [out, in] int8 rows times row scale
    return weight.data.float()


def quantize_roundtrip(weight: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """dequant(quant(weight)) in fp32, with the same settings the 4-bit loader uses.

    Used by the merge to rebuild, from the original checkpoint tensor, the exact weight the adapter was
    trained against. ``weight`` is ``[out, in]`` in any float dtype.
    """
    if quant.bits == 16:
        return weight.float()
    if quant.bits == 8:
        w = weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # [out, 1] row-wise absmax
        return torch.round(w / scale).clamp(-127, 127) * scale
    import bitsandbytes.functional as bnbF

    # quantize from fp32: the codes and scales equal those of a bf16/fp16 input (checked), but bitsandbytes
    # dequantizes into the input's dtype, and a 16-bit result would round the exact codes x absmax values
    packed, state = bnbF.quantize_4bit(weight.float().contiguous(), blocksize=quant.blocksize,
                                       compress_statistics=quant.double_quant, quant_type=quant.quant_type)
    return bnbF.dequantize_4bit(packed, state).float()


def requantize_layer(layer: nn.Module, weight: torch.Tensor, quant: QuantConfig) -> None:
    """Give a 4-bit layer the codes and scales of ``weight`` (``[out, in]``, any float dtype), quantized as the
    loader would have quantized a checkpoint in ``weight.dtype``; the layer keeps dequantizing to fp32.

    The merge's verification uses it to rebuild the 4-bit weights of a run whose loader quantized from another
    dtype than the reference loads in (an fp32 checkpoint trained with bf16 compute). Quantizing from fp32 gives
    the same codes and scales as from the 16-bit input (see ``quantize_roundtrip``) and a fp32 quant state.
    """
    import bitsandbytes.functional as bnbF

    if not is_4bit(layer):
        raise TypeError(f"requantize_layer needs a bitsandbytes 4-bit layer, got {type(layer).__name__}")
    if tuple(weight.shape) != tuple(layer.weight.quant_state.shape):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit the layer {tuple(layer.weight.quant_state.shape)}")
    packed, state = bnbF.quantize_4bit(weight.float().contiguous(), blocksize=quant.blocksize,
                                       compress_statistics=quant.double_quant, quant_type=quant.quant_type)
    layer.weight.data = packed  # [(out·in+1)//2, 1] uint8
    layer.weight.quant_state = state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = state
