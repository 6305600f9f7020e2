"""Fast paths for a frozen 4-bit base plus LoRA: one fused autograd function, and an inference-only weight cache.

**Fused LoRA** (training and evaluation). The unfused ``LoraLinear`` runs bitsandbytes' ``MatMul4Bit`` and then
the adapter in its own (fp32) dtype: every adapted layer copies its input to fp32, multiplies a full
``[tokens, out]`` output by the scale, casts it back and adds it, and autograd mirrors each of those ops in
backward. ``lora_nf4`` does the whole layer in the compute dtype as one autograd function:

    forward:  W = dequant(packed) (compute dtype), u = scale * (x @ A^T) [T, r], y = x @ W^T + u @ B^T (one addmm)
    backward: W = dequant(packed) again, gu = scale * (g @ B), dx = g @ W + gu @ A, dA = gu^T x, dB = g^T u

It saves only ``x`` (the layer input, already alive for the previous op), ``u`` and the packed weight, never a
dequantized weight or an fp32 copy of ``x``. The base matmul uses exactly bitsandbytes' dequantization, so the
base output is bit-identical; the adapter runs in the compute dtype (fp32 params cast on the fly, gradients
returned in the params' dtype), i.e. with bf16 compute the adapter's products are bf16 (as under PEFT with
autocast). Disable with ``QLORA_KIT_FUSED=0`` or ``set_fused(False)``.

**Dequantized-weight cache** (generation only). On CPU every generated token dequantizes every 4-bit weight.
``dequantized_weights(model)`` dequantizes each 4-bit layer once, to its compute dtype, for the duration of a
``with`` block (``generate`` uses it), and frees it afterwards. Memory cost: 2 bytes per quantized parameter
in bf16 (4 in fp32) on top of the 0.52-byte packed weights, e.g. +212 MB for SmolLM2-135M's 106M quantized
parameters in bf16. Grad mode is refused: it is never used in training.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

_ENABLED = os.environ.get("QLORA_KIT_FUSED", "1") != "0"


def set_fused(enabled: bool) -> None:
    """Turn the fused LoRA path on or off for the whole process (for tests and A/B measurements)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fused_enabled() -> bool:
    return _ENABLED


def _packed_state(base: nn.Module):
    """(packed uint8 weight, quant_state) of a plain bnb NF4/FP4 Linear4bit, or None when the fast path can't apply."""
    if not isinstance(base, nn.Linear):  # bnb Linear4bit subclasses nn.Linear; LoraLinear only forwards .weight
        return None
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or weight.dtype != torch.uint8 or getattr(state, "packing_format_for_cpu", False):
        return None
    if state.nested and state.state2.blocksize != 256:
        return None
    return weight.data, state


def dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """``[out, in]`` weight in ``dtype``, computed exactly as bitsandbytes' gemm_4bit does (nested absmax included)."""
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), absmax, state.blocksize,
                                                          state.quant_type, state.shape, dtype)


class _LoraNF4(torch.autograd.Function):
    """y = x W^T + bias + scale (x A^T) B^T for a frozen 4-bit W; x is 2-D ``[T, in]`` in the compute dtype."""

    @staticmethod
    def forward(ctx, x, A, B, packed, state, bias, scale, dense):
        w = dense if dense is not None else dequantize(packed, state, x.dtype)  # [out, in]
        a, b = A.to(x.dtype), B.to(x.dtype)  # [r, in], [out, r]
        u = (x @ a.t()).mul_(scale)  # [T, r]
        y = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)  # [T, out]
        y.addmm_(u, b.t())
        ctx.save_for_backward(x, A, B, u)
        ctx.packed, ctx.state, ctx.scale, ctx.dense = packed, state, scale, dense
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, u = ctx.saved_tensors
        g = g.contiguous()
        a, b = A.to(g.dtype), B.to(g.dtype)
        gu = (g @ b).mul_(ctx.scale)  # [T, r]
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            w = ctx.dense if ctx.dense is not None else dequantize(ctx.packed, ctx.state, g.dtype)
            dx = torch.addmm(g @ w, gu, a)  # [T, in]
        if ctx.needs_input_grad[1]:
            dA = (gu.t() @ x).to(A.dtype)  # [r, in]
        if ctx.needs_input_grad[2]:
            dB = (g.t() @ u).to(B.dtype)  # [out, r]
        return dx, dA, dB, None, None, None, None, None


def try_fused_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The fused output of a ``LoraLinear`` for ``x [..., in]``, or None when the fused path doesn't apply.

    Applies to a bitsandbytes 4-bit base with exactly one active adapter without dropout (the training and
    evaluation case); anything else (several adapters, dropout, 8-bit or 16-bit bases) takes the unfused path.
    """
    if not _ENABLED or len(layer.active) != 1:
        return None
    adapter = layer.adapters[layer.active[0]]
    if not isinstance(adapter.dropout, nn.Identity) and adapter.training:
        return None
    found = _packed_state(layer.base)
    if found is None:
        return None
    packed, state = found
    base = layer.base
    cd = getattr(base, "compute_dtype", None) or x.dtype
    dense = getattr(base, "_qlora_dense", None)
    if dense is not None and (torch.is_grad_enabled() or dense.dtype != cd):
        dense = None
    k = adapter.rank
    x2 = x.reshape(-1, x.shape[-1]).to(cd)  # [T, in]
    y = _LoraNF4.apply(x2, adapter.lora_A[:k], adapter.lora_B[:, :k], packed, state, base.bias,
                       adapter.scale(k), dense)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Inference-only dequantized weights

def _dense_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        raise RuntimeError("dequantized_weights() is inference-only; leave the `with` block before training")
    w = module._qlora_dense
    bias = module.bias.to(w.dtype) if module.bias is not None else None
    return F.linear(x.to(w.dtype), w, bias).to(x.dtype)


@contextlib.contextmanager
def dequantized_weights(model: nn.Module):
    """Inside the block, every bnb 4-bit layer computes with its weight dequantized once (compute dtype).

    Exactly bitsandbytes' dequantization, so outputs match the normal path; costs 2 bytes (bf16) or 4 (fp32)
    per quantized parameter while the block runs, released on exit. Refuses grad mode.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("dequantized_weights() is inference-only: use it under torch.no_grad()")
    patched = []
    try:
        for module in model.modules():
            found = _packed_state(module)
            if found is None or hasattr(module, "_qlora_dense"):
                continue
            packed, state = found
            cd = getattr(module, "compute_dtype", None) or torch.float32
            module._qlora_dense = dequantize(packed, state, cd)
            module.forward = _dense_forward.__get__(module)
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward
            del module._qlora_dense


def dense_cache_bytes(model: nn.Module) -> int:
    """What ``dequantized_weights`` would hold: quantized parameters times their compute dtype's size."""
    total = 0
    for module in model.modules():
        found = _packed_state(module)
        if found is not None:
            cd = getattr(module, "compute_dtype", None) or torch.float32
            total += found[1].shape.numel() * torch.empty((), dtype=cd).element_size()
    return total
