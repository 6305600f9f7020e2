"""Device and compute-dtype choice by hardware."""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from qlora_kit.dtypes import NAMES, dtype_name, parse_dtype

log = logging.getLogger("qlora_kit")
_announced: set[str] = set()  # "compute dtype auto -> ..." lines already logged by this process


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
    message = f"compute dtype auto -> {dtype_name(dtype)} ({why})"
    if message not in _announced:  # planner, validation and loader all ask; the answer is logged once
        _announced.add(message)
        log.info(message)
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


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: taskset, cgroup cpusets), else all of them."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def idle_cores(seconds: float = 0.3) -> float | None:
    """How many of this process's usable cores sat idle over the next ``seconds`` (from /proc/stat's per-CPU
    lines), or None where that can't be read. An instantaneous measure: the 1-minute load average lags a
    competitor that started seconds ago, and counts CPUs this process may not use."""
    import time

    cpus = {f"cpu{i}" for i in usable_cores()}

    def sample() -> tuple[int, int]:
        idle = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name in cpus:
                fields = [int(v) for v in values[:8]]
                idle, total = idle + fields[3] + fields[4], total + sum(fields)  # idle + iowait, all
        return idle, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def choose_cpu_threads() -> int:
    """Set torch's CPU thread count for this process by how many cores are free, and return it.

    One thread per idle core of the ones this process may use (its affinity), at least one, measured over a
    third of a second before the run starts: OpenMP threads that wait on each other at every op barrier made a
    training step several times slower than one thread when another process kept a core busy
    (docs/benchmarks.md). Where /proc/stat can't be read, the
    1-minute load average decides. ``OMP_NUM_THREADS`` or ``QLORA_KIT_THREADS`` in the environment decide
    instead when set.
    """
    import os

    cores = len(usable_cores())
    if os.environ.get("QLORA_KIT_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ.get("QLORA_KIT_THREADS") or os.environ["OMP_NUM_THREADS"])
        why = "from the environment"
    else:
        idle = idle_cores() if cores > 1 else None
        if idle is None:
            idle = cores - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        threads = max(1, min(cores, round(idle)))
        why = f"{idle:.1f} of {cores} cores idle" + (": other processes compete" if threads < cores else "")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, threads))
        log.info("CPU threads: %d (%s)", threads, why)
    return torch.get_num_threads()
