"""Device and compute-dtype choice by hardware."""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("qlora_kit")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
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


def parse_dtype(name: str) -> torch.dtype:
    """Map 'bf16'/'bfloat16'/'fp16'/'float16'/'fp32'/'float32' to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def choose_compute_dtype(requested: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Resolve the compute dtype for 4-bit matmuls and LoRA.

    "auto" picks bf16 on CUDA GPUs that support it (Ampere+), fp16 on older GPUs, and on CPU bf16 only
    with native bf16 (AVX512-BF16/AMX), else fp32: without them bf16 matmuls run 4-6x slower than fp32.
    """
    if requested != "auto":
        return parse_dtype(requested)
    device = device or default_device()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = "CUDA GPU " + ("with" if dtype is torch.bfloat16 else "without") + " bf16 support"
    elif cpu_has_native_bf16():
        dtype, why = torch.bfloat16, "CPU with native bf16 (AVX512-BF16/AMX)"
    else:
        dtype, why = torch.float32, "CPU without native bf16: fp32 matmuls are several times faster here"
    message = f"compute dtype auto -> {str(dtype).removeprefix('torch.')} ({why})"
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
