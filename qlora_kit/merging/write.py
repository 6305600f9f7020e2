"""Stream a merge plan to disk: safetensors shards written tensor by tensor, plus config and tokenizer.

Each output shard's header is computed from the plan (keys, shapes, dtypes) before its data, so every
tensor goes to disk as soon as it is merged: memory holds a few tensors and the pages of the one input
shard being read, never the model. Files are plain safetensors (no pickle) that transformers loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from qlora_kit.atomic import atomic_write_json
from qlora_kit.config import QuantConfig
from qlora_kit.data.contract import load_contract, write_contract
from qlora_kit.merging.plan import (
    INDEX_FILE,
    TOKENIZER_FILES,
    Item,
    MergeError,
    MergePlan,
    Source,
    safetensors_name,
)
from qlora_kit.merging.weights import merged_tensor

COPY_FILES = ("generation_config.json",)


def parse_size(size: str | int) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"64KiB"`` or a plain integer. Raises MergeError when unreadable."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MergeError(f"shard size {size!r}: use a number of bytes or e.g. '2GB', '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def assign_shards(items: list[Item], limit: int) -> list[list[Item]]:
    """Split ``items`` in order into groups of at most ``limit`` bytes (a bigger tensor gets its own shard)."""
    groups: list[list[Item]] = []
    size = 0
    for it in items:
        if not groups or (groups[-1] and size + it.nbytes > limit):
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.nbytes
    return groups


def shard_names(n: int) -> list[str]:
    """transformers' names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header(items: list[Item]) -> bytes:
    """The safetensors header for ``items`` in order: 8-byte little-endian length, then padded JSON."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.key] = {"dtype": safetensors_name(it.dtype), "shape": list(it.shape),
                          "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def return_big_buffers_to_the_os() -> None:
    """Make glibc serve buffers of 1 MiB or more with mmap, so freeing a tensor returns its memory at once.

    By default glibc raises its mmap threshold after the first large free and then keeps freed 10-100 MB
    tensor buffers in its heap; measured on the synthetic multi-shard merge, that doubled peak RSS (156 MiB
    of growth instead of 71 MiB). Process-wide, set once; a no-op without glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also turns off the dynamic threshold)
    except (OSError, AttributeError):
        pass


class CheckpointReader:
    """Reads checkpoint tensors, keeping at most one shard open (memory-mapped) at a time. Call ``close`` after."""

    def __init__(self):
        self.file, self.ctx, self.handle = None, None, None

    def __call__(self, src: Source) -> torch.Tensor:
        """The tensor ``src`` describes, memory-mapped from its shard."""
        if src.file != self.file:
            self.close()
            self.ctx = safe_open(str(src.file), "pt")
            self.handle, self.file = self.ctx.__enter__(), src.file
        return self.handle.get_tensor(src.key)

    def close(self) -> None:
        """Close the open shard, if any."""
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
        self.file, self.ctx, self.handle = None, None, None


def write_model(plan: MergePlan, folder: Path, shard_limit: int, progress: bool = True) -> dict:
    """Write the merged weights, config, generation config and tokenizer into ``folder``.

    Returns ``{"shards", "bytes", "layers"}`` (``layers``: per adapted module statistics).
    Raises MergeError on a NaN/inf merged weight.
    """
    return_big_buffers_to_the_os()
    groups = assign_shards(plan.items, shard_limit)
    names = shard_names(len(groups))
    reader, layers = CheckpointReader(), {}
    bar = tqdm(total=len(plan.items), desc="merge", unit="tensor", disable=not progress)
    try:
        for name, group in zip(names, groups):
            with open(folder / name, "wb") as f:
                f.write(_header(group))
                for it in group:
                    t, stats = merged_tensor(it, plan, reader)
                    assert tuple(t.shape) == it.shape and t.dtype == it.dtype, (it.key, t.shape, t.dtype)
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    if stats is not None:
                        layers[it.module] = stats
                    bar.update()
                f.flush()
                os.fsync(f.fileno())
    finally:
        reader.close()
        bar.close()
    total = sum(it.nbytes for it in plan.items)
    if len(groups) > 1:
        weight_map = {it.key: name for name, group in zip(names, groups) for it in group}
        atomic_write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_side_files(plan, folder)
    return {"shards": len(groups), "bytes": total, "layers": layers}


def write_side_files(plan: MergePlan, folder: Path) -> None:
    """config.json (no quantization_config), generation_config.json and the tokenizer, whose chat template is
    the adapter's prompt contract when it has one (``data.contract``)."""
    atomic_write_json(folder / "config.json", plan.config)
    for name in COPY_FILES:
        if (plan.base / name).is_file():
            shutil.copy2(plan.base / name, folder / name)
    for name in TOKENIZER_FILES:
        if (plan.tokenizer_dir / name).is_file():
            shutil.copy2(plan.tokenizer_dir / name, folder / name)
    contract = load_contract(plan.adapter_dir)
    if contract is not None:
        write_contract(contract, folder)


def requantize_folder(src: Path, dst: Path, quant: QuantConfig, dtype: torch.dtype, shard_limit: int) -> None:
    """Load the merged model in 4-bit with transformers and save it (weights + quantization_config) to ``dst``.

    This holds the 4-bit model in memory (about a quarter of the 16-bit size), not a stream.
    """
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.load import bnb_config

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, quantization_config=bnb_config(quant, dtype),
                                                 device_map={"": "cpu"}, use_safetensors=True)
    model.save_pretrained(str(dst), max_shard_size=shard_limit, safe_serialization=True)
    for name in COPY_FILES + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
