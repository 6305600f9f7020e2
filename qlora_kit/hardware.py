"""Device and compute-dtype choice by hardware."""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from qlora_kit.dtypes import NAMES, dtype_name, parse_dtype

log = logging.getLogger("qlora_kit")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 (the only CPUs where bf16 matmuls beat fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def choose_compute_dtype(requested: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Resolve the compute dtype for 4-bit matmuls and LoRA.

    "auto" picks bf16 on CUDA GPUs that support it (Ampere+), fp16 on older GPUs, and on CPU bf16 only
    with native bf16 (AVX512-BF16/AMX), else fp32: without them bf16 matmuls run 4-6x slower than fp32.
    Any other name is looked up in ``qlora_kit.dtypes``; ValueError names the choices.
    """
    if requested != "auto":
        try:
            return parse_dtype(requested)
        except ValueError:
            raise ValueError(f"unknown compute dtype {requested!r}; use auto, {', '.join(NAMES)}") from None
    device = device or default_device()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = "CUDA GPU " + ("with" if dtype is torch.bfloat16 else "without") + " bf16 support"
    elif cpu_has_native_bf16():
        dtype, why = torch.bfloat16, "CPU with native bf16 (AVX512-BF16/AMX)"
    else:
        dtype, why = torch.float32, "CPU without native bf16: fp32 matmuls are several times faster here"
    log.info("compute dtype auto -> %s (%s)", dtype_name(dtype), why)
    return dtype


def available_memory(device: torch.device) -> int:
    """Bytes a run may use on ``device``: free GPU memory on CUDA, MemAvailable of /proc/meminfo on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**63  # unknown: never force checkpointing on


def choose_cpu_threads() -> int:
    """Set torch's CPU thread count for this process by how busy the machine is, and return it.

    With every core free, all cores. When other processes already keep the cores busy (1-minute load average
    at or above cores - 0.5), one thread: OpenMP threads that wait on each other at every op barrier made a
    training step 6x slower than one thread on a loaded 2-core CPU (docs/benchmarks.md). ``OMP_NUM_THREADS``
    or ``QLORA_KIT_THREADS`` in the environment decide instead when set.
    """
    import os

    cores = os.cpu_count() or 1
    if os.environ.get("QLORA_KIT_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ.get("QLORA_KIT_THREADS") or os.environ["OMP_NUM_THREADS"])
        why = "from the environment"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        busy = cores > 1 and load >= cores - 0.5
        threads = 1 if busy else cores
        why = f"load average {load:.1f} on {cores} cores" + (": other processes compete" if busy else "")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, threads))
        log.info("CPU threads: %d (%s)", threads, why)
    return torch.get_num_threads()
