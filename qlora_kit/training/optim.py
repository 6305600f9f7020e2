"""Building the optimizer a config names (the table: ``qlora_kit.optimizers``) and learning-rate schedules."""
from __future__ import annotations

import logging
import math
import warnings

import torch

from qlora_kit.config import TrainingConfig
from qlora_kit.optimizers import optimizer_spec, resolve_optimizer

log = logging.getLogger("qlora_kit")


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (``qlora_kit.optimizers.OPTIMIZERS``), over ``params``.

    An optimizer that needs another device type (paged ones need CUDA unified memory) falls back to the row's
    ``fallback`` (torch's fused AdamW), and the log says so once. Raises ValueError for an unknown name.
    """
    spec = resolve_optimizer(cfg.optimizer, device.type)
    if spec is not optimizer_spec(cfg.optimizer):
        log.info("optimizer %s: paged memory needs a CUDA GPU; using %s (torch, fused) on %s instead", cfg.optimizer,
                 spec.name, device.type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        return spec.factory(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


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
