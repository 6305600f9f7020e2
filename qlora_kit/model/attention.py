"""Causal attention for short sequences on CPU: the same memory as SDPA's flash kernel, a faster backward.

On CPU, torch's flash-attention kernel is slow at training lengths: for the demo model (SmolLM2-135M,
batch 8 x 112 tokens, 9 heads, 3 KV heads, bf16, one thread) its backward took 25-30 ms per layer,
a fifth of a training step. ``ShortAttention`` computes the same attention with batched matmuls:

    forward:  s = scale * q k^T (fp32) + mask, lse = logsumexp(s), p = exp(s - lse), o = p v
    backward: p recomputed from q, k and lse; dv = p^T g, dp = g v^T, ds = p (dp - rowsum(g o)),
              dq = scale * ds k, dk = scale * ds^T q

It saves what flash saves (q, k, v, o and the fp32 log-sum-exp), never the ``[S, S]`` probabilities, so
the memory planner's SDPA figures hold; the ``[S, S]`` scores exist only transiently, which is why it is
used only while ``batch * heads * S^2`` stays under ``MAX_SCORES`` (larger shapes take SDPA). Grouped-query
attention is computed without repeating k/v: the ``rep`` query heads sharing a KV head are stacked along
the row axis (``[B, KV, rep*S, D]``). Everything after ``q k^T`` runs in fp32 (probabilities and
their gradient are never rounded to 16 bits), so its error against an fp64 reference is no larger than
flash's (rounding them to bf16 was 10% faster but 1.5x less accurate). Only 16-bit inputs take it: in fp32
the flash kernel was faster (0.7-0.8x). Measured (AVX512-BF16 EPYC, one thread, loaded machine, interleaved
medians): 1.65x flash's fwd+bwd at batch 8 x 112 tokens, parity at 256 tokens (hence ``MAX_SCORES``). ``use_short_attention(model)`` switches a CPU model to it for training
(``QLORA_KIT_SHORT_ATTENTION=0`` turns it off); evaluation, generation and GPUs keep SDPA, except a no-grad
forward inside ``training_kernels()`` (DPO's reference, computed as the policy is trained).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

NAME = "qlora_sdpa"  # the attn_implementation name registered with transformers
MAX_SCORES = 1 << 22  # largest batch * heads * S_q * S_k computed here (16 MiB of fp32 scores)
_ENABLED = os.environ.get("QLORA_KIT_SHORT_ATTENTION", "1") != "0"
_AS_TRAINING = False  # set by ``training_kernels``: no-grad forwards take the training kernel too


def _probs(qg: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float, rep: int) -> torch.Tensor:
    """fp32 probabilities ``[B, KV, rep*S, Sk]`` for stacked queries ``qg [B, KV, rep*S, D]``, ``k [B, KV, Sk, D]``."""
    b, kv, rows, sk = qg.shape[0], qg.shape[1], qg.shape[2], k.shape[2]
    s = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)  # [B, KV, rep*S, Sk]
    s.view(b, kv, rep, rows // rep, sk).add_(bias.unsqueeze(2))  # bias: [B or 1, 1, S, Sk], 0 or fp32 min
    return torch.softmax(s, dim=-1)  # torch's fused softmax: far faster on CPU than exp over the scores


class ShortAttention(torch.autograd.Function):
    """o = softmax(scale q k^T + mask) v with q stacked per KV head; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, qg, k, v, bias, scale, rep):
        p = _probs(qg, k, bias, scale, rep)  # [B, KV, rep*S, Sk] fp32
        o = torch.matmul(p, v.float()).to(qg.dtype)  # [B, KV, rep*S, D]
        ctx.save_for_backward(qg, k, v, o, bias)
        ctx.scale, ctx.rep = scale, rep
        return o

    @staticmethod
    def backward(ctx, g):
        qg, k, v, o, bias = ctx.saved_tensors
        g32 = g.float()
        p = _probs(qg, k, bias, ctx.scale, ctx.rep)  # recomputed, [B, KV, rep*S, Sk] fp32
        dv = torch.matmul(p.transpose(-1, -2), g32)  # [B, KV, Sk, D]
        delta = (g32 * o.float()).sum(-1, keepdim=True)  # [B, KV, rep*S, 1]
        dp = torch.matmul(g32, v.float().transpose(-1, -2))  # [B, KV, rep*S, Sk]
        ds = p.mul_(dp.sub_(delta)).mul_(ctx.scale)  # [B, KV, rep*S, Sk] fp32
        dq = torch.matmul(ds, k.float())  # [B, KV, rep*S, D]
        dk = torch.matmul(ds.transpose(-1, -2), qg.float())  # [B, KV, Sk, D]
        return dq.to(qg.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention output ``[B, H, S, D]`` for ``query [B, H, S, D]``, ``key/value [B, KV, Sk, D]``.

    ``allowed`` is a boolean ``[B or 1, 1, S, Sk]`` mask (True: the query may attend to the key).
    Every query row needs at least one allowed key (a fully masked row gets uniform weights, not NaN).
    """
    b, h, s, d = query.shape
    kv = key.shape[1]
    rep = h // kv
    qg = query.reshape(b, kv, rep * s, d)  # heads sharing a KV head stacked along rows
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device)  # [B or 1, 1, S, Sk]
    bias.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    o = ShortAttention.apply(qg, key.contiguous(), value.contiguous(), bias, scale, rep)
    return o.view(b, h, s, d)


@contextlib.contextmanager
def training_kernels(enabled: bool = True):
    """Inside the block (when ``enabled``), a no-grad forward takes the attention kernel a grad-mode (training)
    forward takes, so it rounds exactly as training does: DPO's no-grad reference forward must equal the policy's
    training forward bit for bit when both carry the same weights (16-bit compute; in fp32 both take SDPA)."""
    global _AS_TRAINING
    before, _AS_TRAINING = _AS_TRAINING, _AS_TRAINING or bool(enabled)
    try:
        yield
    finally:
        _AS_TRAINING = before


def set_short_attention(enabled: bool) -> None:
    """Turn the short-sequence path on or off for the whole process (for tests and A/B measurements)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def _applies(query, key, attention_mask, dropout, kwargs) -> bool:
    """Plain 16-bit self-attention with a boolean (or no) mask, no dropout, in training (fp32: flash is faster)."""
    b, h, s, _ = query.shape
    return (_ENABLED and query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
            and (torch.is_grad_enabled() or _AS_TRAINING) and s > 1 and s == key.shape[2]
            and dropout == 0.0 and h % key.shape[1] == 0 and b * h * s * s <= MAX_SCORES
            and (attention_mask is None or attention_mask.dtype == torch.bool)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def short_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: ``(attn_output [B, S, H, D], None)``; SDPA where it doesn't apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _applies(query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    s = query.shape[2]
    if attention_mask is None:  # transformers drops the mask when it is purely causal
        attention_mask = torch.ones(s, s, dtype=torch.bool, device=query.device).tril_()[None, None]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    o = short_attention(query, key, value, attention_mask, scale)  # [B, H, S, D]
    return o.transpose(1, 2).contiguous(), None


def use_short_attention(model: nn.Module) -> bool:
    """Route a CPU SDPA model's attention through ``short_attention_forward``; True if it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, short_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same boolean masks SDPA gets
    for sub in model.modules():
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and getattr(sub_config, "_attn_implementation", None) == "sdpa":
            sub_config._attn_implementation = NAME
    return True
