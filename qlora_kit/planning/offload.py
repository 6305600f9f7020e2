"""How much an offloaded base streams per training step, and what that costs at a measured bandwidth.

Disk offload on the CPU: the frozen weights live in the page cache when they fit. When they do not, the
access pattern is a zig-zag (forward runs layers 0..L-1, backward L-1..0, each layer's recompute and backward
back to back), so the pages an LRU cache kept from the end of one pass are the first ones the next pass needs.
Each pass then reads only what the cache could not hold: ``2 * max(0, streamed - cache)`` bytes per micro-step.

CPU offload to an accelerator: every forward copies each layer's 4-bit weights to the device (the fused
backward keeps the copy its forward saved), so the bytes are the 4-bit weights once per forward pass: twice
per micro-step with gradient checkpointing (forward + recompute), once without.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.config import QuantConfig
from qlora_kit.dtypes import dtype_bytes
from qlora_kit.planning.estimate import frozen_bytes
from qlora_kit.planning.models import architecture


@dataclass
class OffloadTraffic:
    """The bytes an offloaded base moves per micro-step, and the time that adds."""

    mode: str  # "cpu" or "disk"
    file_bytes: float  # bytes offloaded: 4-bit decoder weights, plus (disk) embeddings, norms and head
    streamed_bytes: float  # bytes every micro-step touches: the 4-bit weights and the output head
    cache_bytes: float  # page cache assumed free to hold weights (disk)
    moved_bytes: float  # predicted bytes read from disk / copied to the device per micro-step
    bandwidth: float | None  # bytes/s of the disk (or host-to-device link), if known
    seconds: float | None  # moved_bytes / bandwidth: the time added to a step if nothing overlaps it

    @property
    def first_step_bytes(self) -> float:
        """Bytes moved by the first micro-step: from a cold page cache the forward pass reads everything."""
        if self.mode == "cpu":
            return self.moved_bytes
        return 2 * self.streamed_bytes - min(self.streamed_bytes, self.cache_bytes)

    def slowdown(self, compute_seconds: float) -> float:
        """Predicted step time with offload over the step time without it (``compute_seconds``)."""
        return (compute_seconds + (self.seconds or 0.0)) / compute_seconds

    def __str__(self) -> str:
        s = (f"offload={self.mode}: {self.streamed_bytes / 1e9:.1f} GB of weights used per micro-step, "
             f"{self.moved_bytes / 1e9:.1f} GB moved per micro-step")
        if self.mode == "disk":
            s += f" (page cache {self.cache_bytes / 1e9:.1f} GB)"
        if self.seconds is not None:
            s += f"; at {self.bandwidth / 1e9:.2f} GB/s that adds {self.seconds:.0f} s per micro-step"
        return s


def offload_traffic(model_or_config, mode: str, grad_checkpointing: bool = True, quant: QuantConfig | None = None,
                    compute_dtype: str = "bf16", cache_bytes: float = 0.0,
                    bandwidth: float | None = None) -> OffloadTraffic:
    """Predict the offload traffic of one micro-step (see the module docstring for the model).

    Args:
        model_or_config: as for ``plan_memory``.
        mode: "cpu" or "disk".
        cache_bytes: (disk) memory the page cache can give the weights: free RAM minus the training's own.
        bandwidth: bytes/s of the disk (``read_bandwidth``) or of the host-to-device link.
    """
    if mode not in ("cpu", "disk"):
        raise ValueError(f"offload mode {mode!r}: use cpu or disk")
    arch = architecture(model_or_config)
    cb = dtype_bytes(compute_dtype)
    w4, unquantized = frozen_bytes(arch, quant or QuantConfig(), cb)
    head = cb * arch.vocab * arch.hidden
    if mode == "cpu":
        file_bytes, streamed = w4, w4
        moved = w4 * (2 if grad_checkpointing else 1)
    else:  # the file holds everything; of the input embedding only the batch's rows are read
        file_bytes, streamed = w4 + unquantized, w4 + head
        moved = 2 * max(0.0, streamed - cache_bytes)
    seconds = moved / bandwidth if bandwidth else None
    return OffloadTraffic(mode, file_bytes, streamed, cache_bytes, moved, bandwidth, seconds)


def page_cache_for_weights(plan, available: float) -> float:
    """Bytes of ``available`` RAM the page cache can give the mapped weights while ``plan`` trains.

    The plan's first two rows are the 4-bit and the unquantized weights: with disk offload both are file-backed
    pages, i.e. the cache itself; the rest (LoRA state, activations, transients, overhead) is anonymous memory.
    """
    return max(0.0, available - (plan.total - plan.rows[0].bytes - plan.rows[1].bytes))


def read_bandwidth(path: str | Path, nbytes: int = 2 << 30, chunk: int = 16 << 20) -> float:
    """Sequential read bandwidth (bytes/s) of the disk under ``path``'s file, from a cold page cache.

    The file's cached pages are dropped first (``drop_page_cache``), and dropped again afterwards so the
    measurement leaves the cache as cold as it found it.
    """
    drop_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(nbytes, os.fstat(fd).st_size)
        start, done = time.perf_counter(), 0
        while done < size:
            got = len(os.pread(fd, min(chunk, size - done), done))
            if not got:
                break
            done += got
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    drop_page_cache(path)
    return done / seconds


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to drop ``path``'s cached pages (``posix_fadvise(DONTNEED)``: clean pages, no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
