"""Training checkpoints: written atomically, kept K deep, read back without pickle.

A checkpoint folder ``checkpoints/step-000120/`` holds the adapter (PEFT format), the optimizer state as
``optimizer.safetensors`` + ``optimizer.json`` (tensors and the structure around them), and
``trainer_state.json``. It appears under its final name only once complete, so a folder named
``step-*`` with ``trainer_state.json`` is always whole; temporary folders start with a dot.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import write_adapter_files
from .atomic import atomic_dir, safetensors_bytes

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting the tensors by path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, f"{path}.k{i}"), _flatten(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    """Write ``root/step-{step}`` atomically and delete all but the newest ``keep`` checkpoints."""
    target = root / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(optimizer.state_dict(), tensors)
    # bitsandbytes' 8-bit optimizers share one quantization map (qmap1/qmap2) between parameters, and
    # safetensors refuses tensors that share memory: give every saved tensor its own storage
    tensors = {k: t.clone() for k, t in tensors.items()}
    with atomic_dir(target) as tmp:
        write_adapter_files(tmp, model)
        (tmp / "optimizer.safetensors").write_bytes(safetensors_bytes(tensors))
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    for old in list_checkpoints(root)[:-keep]:  # renamed first: a kill mid-delete leaves no step-* remnant
        trash = old.with_name(f".{old.name}.deleting")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (half-written temp folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_optimizer_state(folder: Path) -> dict:
    """The optimizer state dict saved in ``folder`` (safetensors + JSON; nothing is unpickled)."""
    tensors = load_file(str(folder / "optimizer.safetensors"))
    return _unflatten(json.loads((folder / "optimizer.json").read_text()), tensors)


def load_trainer_state(folder: Path) -> dict:
    """The trainer state (step, best validation loss, ...) saved in ``folder``."""
    return json.loads((folder / STATE_FILE).read_text())


# TEMPORARY (branch wip-h2): a minimal stand-in for the manifest-based verify_checkpoint /
# latest_good_checkpoint being written in parallel; the merged version replaces these two functions.
def verify_checkpoint(folder: Path) -> list[str]:
    """Problems found in one checkpoint folder (empty list = good): unreadable files, non-finite tensors."""
    problems = []
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        try:
            tensors = load_file(str(folder / name))
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint bad
            problems.append(f"{name}: unreadable ({type(e).__name__})")
            continue
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            problems.append(f"{name}: non-finite values in {bad[0]}")
    for name in ("optimizer.json", STATE_FILE):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{name}: unreadable ({type(e).__name__})")
    return problems


def latest_good_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint under ``root`` that verifies, plus the newer ones rejected with their problems."""
    rejected = []
    for folder in reversed(list_checkpoints(root)):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder, rejected
        rejected.append((folder, problems))
    return None, rejected
