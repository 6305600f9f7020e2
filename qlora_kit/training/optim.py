"""Optimizers (bitsandbytes paged / 8-bit AdamW, or torch AdamW) and learning-rate schedules."""
from __future__ import annotations

import logging
import math
import warnings

import torch

from qlora_kit.config import TrainingConfig

log = logging.getLogger("qlora_kit")

_UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_32bit"}


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``params``.

    Paged optimizers need CUDA unified memory; on a CPU they fall back to the unpaged optimizer of the same
    precision, and the log says so once.
    """
    name = cfg.optimizer
    if name in _UNPAGED and device.type != "cuda":
        log.info("optimizer %s: paged memory needs a CUDA GPU; using %s on %s instead", name, _UNPAGED[name], device.type)
        name = _UNPAGED[name]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes.optim as bnb_optim

    cls = {"paged_adamw_8bit": bnb_optim.PagedAdamW8bit, "paged_adamw_32bit": bnb_optim.PagedAdamW32bit,
           "adamw_8bit": bnb_optim.AdamW8bit, "adamw_32bit": bnb_optim.AdamW32bit}[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        return cls(params, **kwargs)


def lr_at(step: int, total_steps: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine, linear or constant."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.scheduler == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (no scheduler state to save: the rate is a function of the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
