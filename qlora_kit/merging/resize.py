"""Shrink an adapter's rank by truncated SVD of each ΔW = scale·B·A, computed cheaply from the factors.

With B = Qb·Rb (``[out, r]`` = ``[out, r]·[r, r]``) and Aᵀ = Qa·Ra, ΔW = scale·Qb·(Rb·Raᵀ)·Qaᵀ, so the SVD of
ΔW is that of the small r×r matrix Rb·Raᵀ = U·S·Vᵀ rotated by Qb and Qa: no out×in matrix is ever formed.
Keeping the top k components gives the best rank-k approximation of ΔW (Eckart–Young).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_kit.atomic import atomic_dir, atomic_write_json, check_replaceable
from qlora_kit.config import ConfigError
from qlora_kit.merging.plan import TOKENIZER_FILES
from qlora_kit.model.adapters import CONFIG_FILE, PREFIX, WEIGHTS_FILE, read_adapter
from qlora_kit.paths import check_output_path

RESIZE_OURS = ("resize_report.json",)  # every resized adapter holds it: --overwrite may replace only such a folder


def factor_svd(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``scale · B @ A`` from its factors: ``(U [out, r], S [r], V [in, r])``, S descending."""
    qb, rb = torch.linalg.qr(b.double())  # [out, r], [r, r]
    qa, ra = torch.linalg.qr(a.double().t())  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)  # [r, r], [r], [r, r]
    return qb @ u, s * abs(scale), (qa @ vh.t()) * math.copysign(1.0, scale)


def truncate(a: torch.Tensor, b: torch.Tensor, scale: float, k: int, new_scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``k`` factors ``(A' [k, in], B' [out, k])`` with ``new_scale·B'A'`` the best rank-k ΔW, and the
    fraction of ΔW's energy (sum of squared singular values) kept."""
    u, s, v = factor_svd(a, b, scale)
    root = (s[:k] / new_scale).sqrt()  # split S between the factors for balanced magnitudes
    b_new = torch.zeros(b.shape[0], k, dtype=b.dtype)  # [out, k]; columns past rank(ΔW) stay zero
    a_new = torch.zeros(k, a.shape[1], dtype=a.dtype)  # [k, in]
    n = root.shape[0]
    b_new[:, :n] = (u[:, :k] * root).to(b.dtype)
    a_new[:n] = (v[:, :k] * root).t().to(a.dtype)
    energy = s.pow(2).sum().item()
    kept = s[:k].pow(2).sum().item() / energy if energy > 0 else 1.0
    return a_new, b_new, kept


def adapter_resize(adapter_dir: str | Path, out_dir: str | Path, rank: int, overwrite: bool = False) -> dict:
    """Write a rank-``rank`` copy of the adapter at ``adapter_dir`` to ``out_dir`` (PEFT format, atomic).

    alpha is chosen so the new adapter's scale equals the old one (alpha' = scale·k, or scale·√k with
    rsLoRA); modules_to_save copies and a tokenizer saved beside the adapter are carried over.
    Returns ``{"rank", "alpha", "layers": {module: energy kept}, "min_energy_kept", "mean_energy_kept"}``,
    also written to ``out_dir/resize_report.json``.
    Raises ConfigError for a rank outside [1, r], or (paths.OutputPathError) for an ``out_dir`` that is, contains
    or lies inside ``adapter_dir``; FileExistsError for an existing ``out_dir`` without overwrite, or one that is
    not an earlier resize output (no resize_report.json), which is never replaced.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_output_path(out_dir, {"--adapter": adapter_dir})
    check_replaceable(out_dir, overwrite, RESIZE_OURS, "adapter-resize")
    ad = read_adapter(adapter_dir)
    cfg = ad.config
    if not 1 <= rank <= cfg.r:
        raise ConfigError(f"rank={rank}: must be in [1, {cfg.r}] for {adapter_dir} (its rank is {cfg.r}); "
                          "resizing only shrinks an adapter")
    scale = cfg.scaling
    alpha = scale * (math.sqrt(rank) if cfg.use_rslora else rank)
    tensors, layers = {}, {}
    for module, (a, b) in sorted(ad.lora.items()):
        a_new, b_new, kept = truncate(a, b, scale, rank, scale)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a_new  # [k, in]
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b_new  # [out, k]
        layers[module] = kept
    for module, params in ad.copies.items():
        for pname, t in params.items():
            tensors[f"{PREFIX}{module}.{pname}"] = t.contiguous()
    report = {"source": str(adapter_dir), "rank": rank, "from_rank": cfg.r, "alpha": alpha, "scale": scale,
              "min_energy_kept": min(layers.values(), default=1.0),
              "mean_energy_kept": sum(layers.values()) / max(len(layers), 1), "layers": layers}
    _write(adapter_dir, out_dir, tensors, ad.meta, rank, alpha, report, overwrite)
    return report


def _write(src: Path, out: Path, tensors: dict, meta: dict, rank: int, alpha: float, report: dict,
           overwrite: bool) -> None:
    """The resized adapter folder: config with the new r and alpha, weights, tokenizer, report."""
    peft_config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    peft_config.update(r=rank, lora_alpha=alpha)
    meta = dict(meta)
    if meta.get("lora"):
        meta["lora"] = {**meta["lora"], "r": rank, "alpha": alpha, "dynamic_rank": False}
    meta["exported_rank"] = rank
    meta["resized_from"] = report["from_rank"]
    with atomic_dir(out, overwrite=overwrite, ours=RESIZE_OURS, kind="adapter-resize") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "qlora_kit": json.dumps(meta)})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        atomic_write_json(tmp / "resize_report.json", report)


def format_resize_summary(report: dict) -> str:
    """One line per extreme: the rank change and how much of ΔW's energy the layers keep."""
    worst = min(report["layers"].items(), key=lambda kv: kv[1], default=("-", 1.0))
    return (f"resized rank {report['from_rank']} -> {report['rank']} (alpha {report['alpha']:g}, scale "
            f"{report['scale']:g}): energy of ΔW kept: mean {100 * report['mean_energy_kept']:.1f}%, "
            f"lowest {100 * worst[1]:.1f}% ({worst[0]})")
