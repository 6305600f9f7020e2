"""Keep the frozen 4-bit base out of anonymous memory: memory-map it from disk, or stream it from the host.

``offload_base(model, "disk", folder)`` writes every bitsandbytes 4-bit layer's packed codes (and its
quant-state absmax tensors) into one flat file, ``<folder>/weights.bin``, with a JSON index
``<folder>/index.json`` (name -> offset, nbytes, shape, dtype; nothing is pickled, and nothing is unpickled
when mapping it back). Both appear atomically (``atomic_dir``). Each ``Params4bit.data`` (and
``quant_state.absmax`` / ``state2.absmax``) then becomes a view onto its own private, read-only-in-practice
memory map of that file (``numpy.memmap(mode="c")``: MAP_PRIVATE, so an accidental in-place write copies a page
and never reaches the file). The OS pages weights in as layers run and can drop them again under pressure:
they count as file-backed (RssFile), not anonymous memory. The in-memory originals are released.

The folder must be on a real disk: a tmpfs (RAM-backed) folder saves nothing.

``"cpu"``: on a CPU device this is a no-op (logged). On an accelerator the packed weights stay on the host and
each 4-bit layer's weights are copied to the device by a forward pre-hook and released by a forward hook
(per linear layer; the next one is prefetched on a side CUDA stream; untested on CUDA). The same hooks also
run for ``"disk"`` on an accelerator, so the device then only holds the layer being computed and the next.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qlora_kit.atomic import atomic_dir
from qlora_kit.model.quant import is_4bit

log = logging.getLogger("qlora_kit")

MODES = ("none", "cpu", "disk")
INDEX_NAME = "index.json"
DATA_NAME = "weights.bin"
FORMAT = "qlora-kit-offload-v2"  # v2: adds the double-quant offset (and whole-model folders)
_ALIGN = 64

# quant-state tensors worth storing (the codebooks are 16/256 floats, shared and kept in memory)
_STATE_FIELDS = (("absmax",), ("offset",), ("state2", "absmax"))


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each 4-bit weight once, under its outermost module: a ``LoraLinear`` forwards its base's ``.weight``, and
    its forward (fused or not) is what runs, so hooks go there; the name is the same before and after LoRA."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if is_4bit(m) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((name, m))
    return out


def _tensors(name: str, module: nn.Module):
    """(key, owner, attribute, tensor) for the packed weight and the stored quant-state tensors of one layer."""
    w = module.weight
    out = [(f"{name}.weight", w, "data", w.data)]
    for path in _STATE_FIELDS:
        owner = w.quant_state
        for attr in path[:-1]:
            owner = getattr(owner, attr, None)
        t = getattr(owner, path[-1], None) if owner is not None else None
        if isinstance(t, torch.Tensor):
            out.append((f"{name}.weight.{'.'.join(path)}", owner, path[-1], t))
    return out


def _set(owner, attr: str, value: torch.Tensor) -> None:
    if attr == "data":
        owner.data = value  # keeps the Params4bit (and its quant_state), swaps its storage
    else:
        setattr(owner, attr, value)


def offload_base(model: nn.Module, mode: str, folder: str | Path | None = None) -> dict:
    """Offload the frozen 4-bit base weights of ``model`` ("none", "cpu" or "disk"; see the module docstring).

    Works before or after ``add_lora`` (a ``LoraLinear`` keeps its base layer as ``.base``).
    Returns a summary: ``{"mode", "layers", "bytes", "file"}``.
    Raises ValueError for an unknown mode or a missing folder for "disk".
    """
    if mode not in MODES:
        raise ValueError(f"model.offload: {mode!r}; use none, cpu or disk")
    layers = _layers(model)
    summary = {"mode": mode, "layers": len(layers), "bytes": 0, "file": None}
    if mode == "none" or not layers:
        return summary
    device = layers[0][1].weight.device
    if mode == "cpu":
        if device.type == "cpu":
            log.info("model.offload=cpu: the model is on the CPU already; nothing to offload")
            return summary
        _to_host(layers)
        stream_layers(model, device)
        log.info("model.offload=cpu: %d 4-bit layers kept on the host, copied to %s one layer at a time",
                 len(layers), device)
        return summary
    if folder is None:
        raise ValueError("model.offload=disk needs a folder for the weight file")
    folder = Path(folder)
    check_replaceable(folder)
    if device.type != "cpu":
        _to_host(layers)
    index, total = _write(layers, folder)
    _map(layers, folder / DATA_NAME, index, total)
    if device.type != "cpu":
        stream_layers(model, device)
    summary.update(bytes=total, file=str(folder / DATA_NAME))
    log.info("model.offload=disk: %d 4-bit layers (%.1f MB) memory-mapped from %s", len(layers), total / 2**20,
             folder / DATA_NAME)
    return summary


def check_replaceable(folder: Path) -> None:
    """Raise ValueError unless ``folder`` is absent, empty, or an offload folder (the only kind we replace)."""
    if folder.exists() and (not folder.is_dir() or set(p.name for p in folder.iterdir()) - {INDEX_NAME, DATA_NAME}):
        raise ValueError(f"{folder}: exists and is not an offload folder; it would be replaced (give an empty or "
                         "new folder)")


class OffloadWriter:
    """Append tensors to ``<folder>/weights.bin`` (64-byte aligned) and write the JSON index on close.

    Use as a context manager: the folder appears atomically (``atomic_dir``) only if the block completes, so an
    interrupted write never leaves a half folder behind. ``meta`` entries go into the index next to the tensors.
    """

    def __init__(self, folder: str | Path, meta: dict | None = None):
        self.folder, self.meta, self.entries, self.offset = Path(folder), dict(meta or {}), {}, 0

    def __enter__(self) -> OffloadWriter:
        self._dir = atomic_dir(self.folder, ours=(INDEX_NAME, DATA_NAME), kind="offload")
        tmp = self._dir.__enter__()
        self._tmp, self._file = tmp, open(tmp / DATA_NAME, "wb")
        return self

    def add(self, key: str, t: torch.Tensor) -> None:
        """Append one tensor's bytes under ``key``."""
        raw = t.detach().contiguous().view(-1).view(torch.uint8)  # [nbytes]
        pad = -self.offset % _ALIGN
        self._file.write(b"\0" * pad)
        self.offset += pad
        self._file.write(memoryview(raw.numpy()))
        self.entries[key] = {"offset": self.offset, "nbytes": raw.numel(), "shape": list(t.shape),
                             "dtype": str(t.dtype).removeprefix("torch.")}
        self.offset += raw.numel()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                self.index = {"format": FORMAT, "total_bytes": self.offset, **self.meta, "tensors": self.entries}
                (self._tmp / INDEX_NAME).write_text(json.dumps(self.index, indent=1) + "\n", encoding="utf-8")
        finally:
            self._dir.__exit__(exc_type, exc, tb)
        return False


def _write(layers, folder: Path) -> tuple[dict, int]:
    with OffloadWriter(folder) as w:
        for name, module in layers:
            for key, _, _, t in _tensors(name, module):
                w.add(key, t)
    return w.index, w.offset


def read_index(folder: str | Path) -> dict:
    """The JSON index of an offload folder (plain ``json.loads``; never pickle)."""
    index = json.loads((Path(folder) / INDEX_NAME).read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a {FORMAT} offload folder (format {index.get('format')!r}); delete it and "
                         "let qlora-kit write it again")
    return index


def map_offloaded(model: nn.Module, folder: str | Path) -> int:
    """Point a freshly loaded model's 4-bit layers at an existing offload folder; returns the mapped bytes.

    Every layer's names, shapes and dtypes must match the index (same checkpoint and quant settings).
    """
    folder = Path(folder)
    index = read_index(folder)
    layers = _layers(model)
    _map(layers, folder / DATA_NAME, index, index["total_bytes"])
    return index["total_bytes"]


def file_view(path: Path, entry: dict) -> torch.Tensor:
    """One index entry as a tensor on its own private memory map of ``path`` (copy-on-write, paged in lazily).

    One map per tensor, not one for the file: Linux's default overcommit heuristic refuses a single private
    writable map larger than RAM + swap, which a 70B-class file is.
    """
    import numpy as np

    dtype = getattr(torch, entry["dtype"])
    if entry["nbytes"] == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=entry["offset"], shape=(entry["nbytes"],))
    return torch.from_numpy(raw).view(dtype).view(entry["shape"])  # keeps the map alive as long as it lives


def _map(layers, path: Path, index: dict, total: int) -> None:
    entries = index["tensors"]
    for name, module in layers:
        for key, owner, attr, t in _tensors(name, module):
            e = entries.get(key)
            if e is None or e["shape"] != list(t.shape) or e["dtype"] != str(t.dtype).removeprefix("torch."):
                raise ValueError(f"{path}: entry {key!r} missing or different from the model "
                                 f"({e and e['shape']} {e and e['dtype']} vs {list(t.shape)} {t.dtype})")
            _set(owner, attr, file_view(path, e))  # the original tensor loses its last reference here


def is_file_backed(t: torch.Tensor, path: str | Path) -> bool:
    """True if ``t``'s memory lies inside a mapping of ``path`` in this process (Linux /proc/self/maps)."""
    path = str(Path(path).resolve())
    ptr = t.data_ptr()
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().removesuffix(" (deleted)") == path:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


# ---------------------------------------------------------------------------------------------
# Host -> device streaming (accelerators; on the CPU it is a device->device no-op, which is how it is tested)

def _to_host(layers) -> None:
    for name, module in layers:
        for _, owner, attr, t in _tensors(name, module):
            _set(owner, attr, t.to("cpu"))
        state = module.weight.quant_state
        state.code = state.code.cpu()
        if getattr(state, "nested", False):
            state.offset = state.offset.cpu()
            state.state2.code = state.state2.code.cpu()


def stream_layers(model: nn.Module, device: torch.device | str, prefetch: bool = True) -> list:
    """Forward hooks that copy each 4-bit layer's host weights to ``device`` before it runs, and drop them after.

    With ``prefetch`` the pre-hook of one layer also starts copying the next layer in forward order (on a
    side CUDA stream when ``device`` is a GPU, so the copy overlaps the compute; a plain copy elsewhere), so
    at most two layers' weights are on the device. Backward (and gradient-checkpointing recompute) keep
    whatever the forward saved, so gradients are unchanged. Returns the hook handles.
    """
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    layers = []
    for name, module in _layers(model):
        tensors = [(owner, attr, t) for _, owner, attr, t in _tensors(name, module)]
        state = module.weight.quant_state
        tensors.append((state, "code", state.code))
        if getattr(state, "nested", False):
            tensors.append((state.state2, "code", state.state2.code))
        layers.append((module, tensors))
    pending: dict[int, tuple] = {}  # at most one prefetched layer: index -> (device copies, CUDA event or None)

    def start_copy(i: int) -> tuple:
        if stream is None:
            return [t.to(device) for _, _, t in layers[i][1]], None
        with torch.cuda.stream(stream):
            copies = [t.to(device, non_blocking=True) for _, _, t in layers[i][1]]
            event = torch.cuda.Event()
            event.record(stream)
        return copies, event

    def pre(mod, args, i):
        copies, event = pending.pop(i, None) or start_copy(i)
        pending.clear()  # a prefetch the run did not use (the recompute runs layers in reverse order)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
            for t in copies:
                t.record_stream(torch.cuda.current_stream(device))
        for (owner, attr, _), t in zip(layers[i][1], copies):
            _set(owner, attr, t)
        if prefetch and i + 1 < len(layers):
            pending[i + 1] = start_copy(i + 1)

    def post(mod, args, output, i):
        for owner, attr, t in layers[i][1]:
            _set(owner, attr, t)

    handles = []
    for i, (module, _) in enumerate(layers):
        handles += [module.register_forward_pre_hook(lambda m, a, i=i: pre(m, a, i)),
                    module.register_forward_hook(lambda m, a, o, i=i: post(m, a, o, i))]
    return handles
