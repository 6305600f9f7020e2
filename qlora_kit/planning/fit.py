"""Refuse, before any allocation, a run the memory planner says cannot fit this machine by a wide margin.

``check_fits`` plans the run (``planning.memory.plan_memory``, from config.json alone) and compares the predicted peak
with ``hardware.available_memory``. Only a clear misfit is refused: more than ``REFUSE_MARGIN`` (1.5) times the
available memory. The planner is an estimate, the OS can page, and a run a little over its budget may still
finish; a run that needs 50 times the machine (``lora.r: 1000000``) cannot, and would only die in the
out-of-memory killer after minutes of loading. ``force=True`` (``--force``) skips the refusal.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from qlora_kit import hardware
from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.dtypes import dtype_name
from qlora_kit.optimizers import resolve_optimizer
from qlora_kit.planning.estimate import GiB
from qlora_kit.planning.memory import MemoryPlan, plan_memory

log = logging.getLogger("qlora_kit")

REFUSE_MARGIN = 1.5  # refuse when the predicted peak exceeds this multiple of the available memory


def rows_per_example(objective: str) -> int:
    """Sequences one training example puts into a micro-batch: 1 for sft, 2 for a dpo/orpo pair (chosen and
    rejected, ``collate_pairs``), each as long as the pair's longer side."""
    return 1 if objective == "sft" else 2


def plan_run(config: TrainConfig, model_path: Path, seq_len: int, device: torch.device, grad_checkpointing: bool,
             targets: list[str] | str = "all-linear", device_memory: float | None = None) -> MemoryPlan:
    """The memory plan of ``config`` on ``device`` at ``seq_len`` tokens per sequence (reads config.json only).

    A micro-batch of dpo/orpo pairs is ``2 x batch_size`` rows (chosen and rejected, ``collate_pairs``), each as
    long as the longer side of its pair (``seq_len``). The DPO reference's no-grad forward keeps no activations
    for backward, so it adds nothing at the peak the plan describes."""
    dtype = dtype_name(hardware.choose_compute_dtype(config.model.compute_dtype, device))
    rows = config.training.batch_size * rows_per_example(config.training.objective)
    return plan_memory(str(model_path / "config.json"), seq_len=seq_len, batch=rows,
                       rank=config.lora.r, targets=targets, optimizer=resolve_optimizer(config.training.optimizer, device.type).name,
                       grad_checkpointing=grad_checkpointing, quant=config.quant, compute_dtype=dtype,
                       device=device.type, device_memory=device_memory, offload=config.model.offload,
                       loss_chunk=config.training.loss_chunk_size)


def check_fits(config: TrainConfig, model_path: Path, seq_len: int, targets: list[str] | None,
               force: bool = False) -> MemoryPlan | None:
    """Raise ConfigError when the run needs more than REFUSE_MARGIN x the available memory, unless ``force``.

    Args:
        config, model_path: the run and its checkpoint folder (only config.json is read).
        seq_len: the longest sequence the run will train on.
        targets: full names of the layers LoRA wraps (None: every linear layer).
        force: plan and log, but never refuse.
    Returns:
        The plan, or None when the planner cannot describe this architecture (then nothing is refused).
    """
    device = torch.device(config.model.device) if config.model.device else hardware.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():  # a GPU config validated on another machine
        log.info("memory check skipped: model.device=%s but no CUDA device here", config.model.device)
        return None
    available = float(hardware.available_memory(device))
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets}) if targets else "all-linear"
    try:
        plan = plan_run(config, model_path, seq_len, device, config.training.gradient_checkpointing != "off",
                        leaves, available)
    except ConfigError as e:  # an architecture or target list the planner does not know
        log.info("memory check skipped: the planner cannot plan %s (%s)", model_path, e)
        return None
    need = plan.total - (plan.spillable if device.type == "cuda" else 0.0)  # paged state spills only from a GPU
    if need <= REFUSE_MARGIN * available:
        return plan
    biggest = sorted(plan.rows, key=lambda row: row.at_peak, reverse=True)[:3]
    items = ", ".join(f"{row.item} {row.at_peak / GiB:.1f} GiB" for row in biggest)
    message = (f"memory: this run needs about {need / GiB:.1f} GiB at its peak but {available / GiB:.1f} GiB is "
               f"available on {device.type} (refused above {REFUSE_MARGIN}x); biggest: {items}; the planner's advice: "
               f"{plan.advice}; or lower lora.r, training.batch_size or data.max_seq_len; --force (force=True) runs it anyway")
    if not force:
        raise ConfigError(message)
    log.warning("%s (forced)", message)
    return plan
