"""One merged tensor: ``W' = W_base + scale · B @ A`` in fp32, then cast; and what the cast did to the delta.

``W_base`` is ``dequant(quant(W))`` with the quantization the adapter was trained against (dequantized mode: it
reproduces the trained function) or the checkpoint's own ``W`` (original mode). ``merged_tensor`` is the one
place this arithmetic lives: the safetensors writer and the GGUF exporter both call it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlora_kit.merging.plan import Item, MergeError, MergePlan, Source
from qlora_kit.model.quant import quantize_roundtrip

Reader = Callable[[Source], torch.Tensor]  # reads one checkpoint tensor (write.CheckpointReader)
# A cast that changes the merged weights by more than this fraction of ||ΔW|| (the weighted mean of the
# layers' cast_error_rel_to_delta) loses a visible part of the adapter: the report notes it, and the merge's
# dtype "auto" writes fp32 instead.
CAST_ERROR_LIMIT = 0.1


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """``scale * B[:, :rank] @ A[:rank]`` in fp32: ``[out, in]``."""
    return (b[:, :rank].float() @ a[:rank].float()) * scale  # [out, k] @ [k, in]


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> float:
    """||scale · B[:, :rank] @ A[:rank]||_F from the factors: scale·sqrt(sum((BᵀB) ⊙ (AAᵀ))), no [out, in] matrix."""
    a, b = a[:rank].double(), b[:, :rank].double()  # [k, in], [out, k]
    return abs(scale) * ((b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt().item()


def merged_tensor(item: Item, plan: MergePlan | None, read: Reader) -> tuple[torch.Tensor, dict | None]:
    """The output tensor for ``item``, cast to ``item.dtype``, and, for adapted layers, its per-layer statistics.

    ``read(source)`` returns the checkpoint tensor; ``plan`` may be None when no item is adapted or round-tripped
    (an already merged folder). With ``item.dtype`` fp32 (``build_plan(..., dtype="fp32")``) this is the merged
    fp32 weight. Works in place on one fp32 buffer so that a merge holds about three copies of the largest tensor
    at a time. Statistics: ``delta_norm``, ``delta_rel_to_weight``, ``cast_error_rel_to_delta`` (and with
    ``plan.requantize``: ``requant_retained``, ``requant_error_rel_to_delta``). Raises MergeError on a NaN or inf
    result.
    """
    w = item.copy if item.copy is not None else read(item.source)
    if not w.is_floating_point():
        return w, None
    if item.module is None and not item.roundtrip:
        return w.to(item.dtype), None
    w_norm = torch.linalg.vector_norm(w, dtype=torch.float32).item()
    merged = _base_weight(w, item.roundtrip, plan, fresh=w is item.copy)  # [out, in] fp32, ours to modify
    base_deq = None
    if item.module is not None and plan.requantize is not None:  # the weight training saw, for survival stats
        base_deq = merged.clone() if item.roundtrip else quantize_roundtrip(w.to(plan.loader_dtype), plan.quant)
    del w
    if item.module is not None:
        a, b = plan.adapter.lora[item.module]
        k = plan.rank
        merged.addmm_(b[:, :k].float(), a[:k].float(), alpha=plan.scale)  # += scale · [out, k] @ [k, in]
    if not torch.isfinite(merged).all():
        raise MergeError(f"{item.module or item.key}: the merged weight has NaN or inf values (check the adapter "
                         f"{plan.adapter_dir} for NaN/inf, e.g. a diverged training run)")
    out = merged.to(item.dtype)
    stats = _layer_stats(item, w_norm, merged, out, base_deq, plan) if item.module is not None else None
    return out, stats


def _base_weight(w: torch.Tensor, roundtrip: bool, plan: MergePlan, fresh: bool) -> torch.Tensor:
    """The fp32 weight the adapter is added to: dequant(quant(W)) as the loader built it, or W.

    ``fresh`` forces a copy when ``w`` must not be modified (an adapter tensor)."""
    if roundtrip:
        return quantize_roundtrip(w.to(plan.loader_dtype), plan.quant)  # [out, in], a new tensor
    return w.to(torch.float32, copy=fresh)


def _layer_stats(item: Item, w_norm: float, merged: torch.Tensor, out: torch.Tensor, base_deq, plan: MergePlan) -> dict:
    """Whether the delta survives: ||ΔW||/||W||, the output cast's error and (re-quantizing) the 4-bit one, relative to ||ΔW||.

    May overwrite ``merged`` (it is no longer needed once ``out`` exists)."""
    a, b = plan.adapter.lora[item.module]
    d = max(delta_norm(a, b, plan.scale, plan.rank), 1e-30)
    cast = 0.0 if out.dtype == torch.float32 else merged.sub_(out.float()).norm().item() / d
    stats = {"delta_norm": d, "delta_rel_to_weight": d / max(w_norm, 1e-30), "cast_error_rel_to_delta": cast}
    if base_deq is not None:
        delta = lora_delta(a, b, plan.scale, plan.rank)  # [out, in]
        shift = quantize_roundtrip(out, plan.requantize).sub_(base_deq)  # what re-quantizing keeps of ΔW
        stats["requant_retained"] = (shift * delta).sum().item() / (d * d)
        stats["requant_error_rel_to_delta"] = shift.sub_(delta).norm().item() / d
    return stats


def weighted_mean(layers: dict[str, dict], field: str) -> float | None:
    """The ||ΔW||²-weighted mean of a per-layer statistic (so big deltas count more); None without layers."""
    pairs = [(s[field], s["delta_norm"] ** 2) for s in layers.values() if field in s]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None
