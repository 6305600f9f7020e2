"""The verdict of a plan against a memory budget: fits or not, the largest batch and sequence length that fit,
and the cheapest change that makes a plan fit.

The changes are tried cheapest first: those that leave the trained adapter the same (checkpointing, an 8-bit
or paged optimizer, the chunked loss, batch 1 with accumulation, the frozen base offloaded), then those that
change it (a lower LoRA rank). One change alone, then all of them together, then all of them with shorter
sequences; when nothing fits on one device, the number of FSDP devices that would.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlora_kit.optimizers import optimizer_spec
from qlora_kit.planning.estimate import PlanSettings, gib, peak
from qlora_kit.planning.models import Architecture

_OFFLOAD = {  # by device type: where the frozen base goes
    "cuda": (("offload the frozen 4-bit base to host memory (--offload cpu, model.offload: cpu, "
              "its weights stream to the GPU every step)"), "cpu"),
    "cpu": (("offload the frozen 4-bit base to disk (--offload disk, model.offload: disk, "
             "memory-mapped and paged in by the OS)"), "disk"),
}


@dataclass
class Verdict:
    """A plan against a budget."""

    fits: bool  # the peak fits the budget with every optimizer state on the device
    max_batch: int  # largest batch that fits at the plan's seq_len (0: none)
    max_seq_len: int  # largest sequence length (multiple of 64) that fits at the plan's batch (0: none)
    advice: str  # what is spare, or the cheapest change that makes it fit


def fits(arch: Architecture, s: PlanSettings, budget: float) -> bool:
    """True when ``s`` fits ``budget`` bytes, paged optimizer state spilled to host memory if need be."""
    _, top = peak(arch, s)
    return top.total - top.spill <= budget


def largest(arch: Architecture, s: PlanSettings, key: str, budget: float, step: int, limit: int) -> int:
    """The largest multiple of ``step`` (up to ``limit``) for setting ``key`` that fits ``budget``; 0 if none."""
    if not fits(arch, dataclasses.replace(s, **{key: step}), budget):
        return 0
    lo, hi = 1, max(1, limit // step)
    while lo < hi:  # memory grows with batch and seq_len, so bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(arch, dataclasses.replace(s, **{key: mid * step}), budget) else (lo, mid - 1)
    return lo * step


def changes(s: PlanSettings) -> list[tuple[str, dict]]:
    """The changes that save memory under ``s``, cheapest first: (what to tell the user, the settings it sets)."""
    out = []
    if not s.grad_checkpointing:
        out.append(("turn gradient checkpointing on (+~33% compute)", {"grad_checkpointing": True}))
    spec = optimizer_spec(s.optimizer)
    if spec.state_bits > 8:
        out.append(("use the 8-bit AdamW (adamw_8bit)", {"optimizer": "adamw_8bit"}))
    if not spec.paged:
        out.append(("use paged_adamw_8bit (states spill to host memory)", {"optimizer": "paged_adamw_8bit"}))
    if not s.chunked_loss:
        out.append(("use the chunked loss", {"chunked_loss": True}))
    if s.batch > 1:
        out.append(("use batch 1 with gradient accumulation", {"batch": 1}))
    if s.offload == "none":
        label, where = _OFFLOAD["cpu" if s.device == "cpu" else "cuda"]
        out.append((label, {"offload": where}))
    for r in (8, 4):
        if s.rank > r:
            out.append((f"lower the LoRA rank to {r}", {"rank": r}))
    return out


def cheapest_fix(arch: Architecture, s: PlanSettings, budget: float) -> str:
    """The cheapest change that makes ``s`` fit ``budget``, as advice: one change alone, else the fewest cheapest
    changes together, else all of them with shorter sequences, else how many FSDP devices would hold it."""
    options = changes(s)
    for label, change in options:  # one change alone, cheapest first
        if fits(arch, dataclasses.replace(s, **change), budget):
            return f"cheapest fix: {label}"
    applied: dict = {}
    said: dict[str, str] = {}  # setting -> the label of the change that set it last (rank 4 supersedes rank 8)
    for label, change in options:  # then the cheapest changes together, one more at a time
        applied.update(change)
        said.update(dict.fromkeys(change, label))
        together = "; ".join(dict.fromkeys(said.values()))
        if fits(arch, dataclasses.replace(s, **applied), budget):
            return f"cheapest fix: combine {together}"
    every = dataclasses.replace(s, **applied)
    seq = largest(arch, every, "seq_len", budget, 64, s.seq_len)
    if seq:
        return f"cheapest fix: {'combine ' + together + '; and ' if options else ''}shorten sequences to {seq} tokens"
    _, floor = peak(arch, dataclasses.replace(every, seq_len=64))
    return (f"no setting makes it fit one device: even at 64 tokens with every saving it needs {gib(floor.total)}"
            f"{_fsdp_hint(arch, s, budget)}")


def _fsdp_hint(arch: Architecture, s: PlanSettings, budget: float) -> str:
    """How many FSDP devices of ``budget`` bytes each would hold ``s`` with its other settings unchanged."""
    if s.strategy == "fsdp":
        return ""
    for n in (2, 4, 8, 16, 32, 64):
        if fits(arch, dataclasses.replace(s, strategy="fsdp", devices=n), budget):
            return f"; shard it with --strategy fsdp --devices {n}"
    return "; even 64 FSDP devices of this size are too few"


def judge(arch: Architecture, s: PlanSettings, budget: float) -> Verdict:
    """Settings ``s`` against ``budget`` bytes per device: fits, the largest batch/seq_len, and advice."""
    _, top = peak(arch, s)
    max_batch = largest(arch, s, "batch", budget, 1, 4096)
    max_seq = largest(arch, s, "seq_len", budget, 64, 1 << 20)
    if top.total <= budget:
        advice = f"{gib(budget - top.total)} to spare"
    elif top.total - top.spill <= budget:
        advice = f"{gib(top.total - budget)} of paged optimizer state moves to host memory (slower steps)"
    else:
        advice = cheapest_fix(arch, s, budget)
    return Verdict(top.total <= budget, max_batch, max_seq, advice)
