"""Training checkpoints: written atomically, kept K deep, read back without pickle.

A checkpoint folder ``checkpoints/step-000120/`` holds the adapter (PEFT format), the optimizer state as
``optimizer.safetensors`` + ``optimizer.json`` (tensors and the structure around them), and
``trainer_state.json``, then ``manifest.json`` (size + sha256 of every file, see manifest.py), written last.
It appears under its final name only once complete, so a folder named ``step-*`` is always whole when
written; temporary folders start with a dot. What happens to it afterwards (a truncated copy, a flipped bit,
a deleted file) is caught by ``verify_checkpoint`` before a resume trusts it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qlora_kit.atomic import atomic_dir, safetensors_bytes
from qlora_kit.config import ConfigError
from qlora_kit.model.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterFile, read_adapter, write_adapter_files
from qlora_kit.training.manifest import MANIFEST_FILE, VERSION, check_manifest, write_manifest

log = logging.getLogger("qlora_kit")
_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE = "optimizer.safetensors", "optimizer.json"
_FALLBACK = "resume again to fall back to the newest checkpoint that verifies"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE, STATE_FILE)


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated or unparseable; ``problem`` starts with the file's name."""

    def __init__(self, folder: Path, problem: str, fix: str = _FALLBACK):
        super().__init__(f"{folder}: {problem}; {fix}")
        self.folder, self.problem = Path(folder), problem


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
    """Write ``root/step-{step}`` atomically, its manifest last, then rotate old checkpoints (see ``_rotate``)."""
    target = root / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(optimizer.state_dict(), tensors)
    # bitsandbytes' 8-bit optimizers share one quantization map (qmap1/qmap2) between parameters, and
    # safetensors refuses tensors that share memory: give every saved tensor its own storage
    tensors = {k: t.clone() for k, t in tensors.items()}
    with atomic_dir(target, ours=(STATE_FILE,), kind="checkpoint") as tmp:
        write_adapter_files(tmp, model)
        (tmp / OPTIMIZER_TENSORS).write_bytes(safetensors_bytes(tensors))
        (tmp / OPTIMIZER_STRUCTURE).write_text(json.dumps(structure))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "manifest_version": VERSION}, indent=2) + "\n")
        write_manifest(tmp)
    _rotate(root, target, keep)
    return target


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))


def _rotate(root: Path, newest: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to ``newest``, and every checkpoint past it.

    ``newest`` was just written and hashed, so the newest good checkpoint is never deleted. Checkpoints with a
    higher step are left from before a resume that fell back (or rolled back) to an earlier one: they were
    rejected or abandoned, and a later resume must not pick them. Older checkpoints are not re-verified here.
    """
    found = list_checkpoints(root)
    abandoned = [p for p in found if _step_of(p) > _step_of(newest)]
    for old in abandoned + [p for p in found if p not in abandoned][:-keep]:
        if old in abandoned:
            log.info("removing %s: it is past %s, from before this run resumed from an earlier checkpoint",
                     old, newest.name)
        trash = old.with_name(f".{old.name}.deleting")  # renamed first: a kill mid-delete leaves no step-* remnant
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (``step-*`` holding a trainer state or a manifest), oldest first.

    Half-written temp folders (dot-names) are ignored. Listed does not mean good: see ``verify_checkpoint``.
    """
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
             and ((p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file())]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder, or None (unverified: resume uses ``latest_good_checkpoint``)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _short(e: BaseException) -> str:
    """An exception as one short line: its type and message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _read_json(folder: Path, name: str) -> Any:
    """Parse ``folder/name``; any failure is a CheckpointError naming the file."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(folder, f"{name}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(folder, f"{name} line {e.lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError, OSError) as e:  # not UTF-8, absurdly nested, unreadable
        raise CheckpointError(folder, f"{name}: cannot be read ({_short(e)})") from None


def _read_tensors(folder: Path, name: str, header_only: bool = False) -> dict[str, torch.Tensor]:
    """Load ``folder/name`` (safetensors); ``header_only`` just checks that it parses and returns {}."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(folder, f"{name}: missing")
    try:
        if header_only:
            with safe_open(str(path), "pt") as f:
                f.keys()
            return {}
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, garbage), OSError: whatever it is, name the file
        raise CheckpointError(folder, f"{name}: not a readable safetensors file ({_short(e)})") from None


def _optimizer_parts(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(optimizer state dict, its tensors by path), read from safetensors + JSON; raises CheckpointError."""
    tensors = _read_tensors(folder, OPTIMIZER_TENSORS)
    structure = _read_json(folder, OPTIMIZER_STRUCTURE)
    try:
        state = _unflatten(structure, tensors)
    except KeyError as e:
        raise CheckpointError(folder, f"{OPTIMIZER_STRUCTURE}: refers to tensor {e.args[0]!r}, which "
                                      f"{OPTIMIZER_TENSORS} does not hold") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(folder, f"{OPTIMIZER_STRUCTURE}: malformed ({_short(e)})") from None
    if not (isinstance(state, dict) and "state" in state and "param_groups" in state):
        raise CheckpointError(folder, f"{OPTIMIZER_STRUCTURE}: not an optimizer state "
                                      "(no \"state\" and \"param_groups\")")
    return state, tensors


def load_optimizer_state(folder: Path) -> dict:
    """The optimizer state dict saved in ``folder`` (safetensors + JSON; nothing is unpickled).

    Raises CheckpointError naming the file when a file is missing or does not parse.
    """
    return _optimizer_parts(Path(folder))[0]


_STATE_TYPES = {"best_eval_loss": (int, float, type(None)), "best_step": (int, type(None)), "bad_evals": (int,),
                "best_exact_match": (int, float, type(None))}


def load_trainer_state(folder: Path) -> dict:
    """The trainer state (step, best validation loss, ...) saved in ``folder``.

    Raises CheckpointError naming the file when it is missing, does not parse, or holds a wrongly typed value.
    """
    folder = Path(folder)
    state = _read_json(folder, STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(folder, f"{STATE_FILE}: not a JSON object")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(folder, f"{STATE_FILE}: \"step\" is {step!r}, not a non-negative integer")
    for key, types in _STATE_TYPES.items():
        if key in state and (not isinstance(state[key], types) or isinstance(state[key], bool)):
            raise CheckpointError(folder, f"{STATE_FILE}: \"{key}\" is {state[key]!r}, of the wrong type")
    return state


def read_checkpoint_adapter(folder: Path) -> AdapterFile:
    """The adapter saved in checkpoint ``folder``; raises CheckpointError naming the file for any problem."""
    folder = Path(folder)
    if not isinstance(_read_json(folder, CONFIG_FILE), dict):
        raise CheckpointError(folder, f"{CONFIG_FILE}: not a JSON object")
    _read_tensors(folder, WEIGHTS_FILE, header_only=True)  # a truncated or garbled file fails here, by name
    try:
        return read_adapter(folder)
    except ConfigError as e:  # its messages start with the full path: keep the file name only
        raise CheckpointError(folder, str(e).replace(f"{folder}{os.sep}", "")) from None
    except Exception as e:  # both files parse, so what is left is a wrong value in the config
        raise CheckpointError(folder, f"{CONFIG_FILE}: {_short(e)}") from None


def _nonfinite(name: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """A problem line when a floating-point tensor holds NaN/inf, else None."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"{name}: {len(bad)} tensor(s) hold NaN/inf values (first: {bad[0]})"
    return None


def _adapter_problem(folder: Path) -> str | None:
    adapter = read_checkpoint_adapter(folder)
    tensors = {f"{m}.lora_{ab}.weight": t for m, pair in adapter.lora.items() for ab, t in zip("AB", pair)}
    tensors.update({f"{m}.{p}": t for m, params in adapter.copies.items() for p, t in params.items()})
    return _nonfinite(WEIGHTS_FILE, tensors)


def _optimizer_problem(folder: Path) -> str | None:
    return _nonfinite(OPTIMIZER_TENSORS, _optimizer_parts(folder)[1])


def _state_problem(folder: Path) -> str | None:
    step, match = load_trainer_state(folder)["step"], _STEP_DIR.match(folder.name)
    if match and int(match.group(1)) != step:
        return f"{STATE_FILE}: step {step}, but the folder is {folder.name}"
    return None


_CONTENT_CHECKS = (((CONFIG_FILE, WEIGHTS_FILE), _adapter_problem),
                   ((OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE), _optimizer_problem), ((STATE_FILE,), _state_problem))


def _verify(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"{folder.name}: not a folder"]
    listed, found = check_manifest(folder)
    flagged, problems = {name for name, _ in found}, [p for _, p in found]
    if listed is not None and MANIFEST_FILE not in flagged:
        for name in REQUIRED:
            if name not in listed:
                flagged.add(name)
                missing = "" if (folder / name).is_file() else " (and missing)"
                problems.append(f"{name}: not listed in {MANIFEST_FILE}{missing}")
    for names, check in _CONTENT_CHECKS:
        if flagged.isdisjoint(names):
            try:
                problem = check(folder)
            except CheckpointError as e:
                problem, flagged = e.problem, flagged | set(names)
            if problem:
                problems.append(problem)
    if listed is None and STATE_FILE not in flagged and load_trainer_state(folder).get("manifest_version"):
        problems.append(f"{MANIFEST_FILE}: missing, but this checkpoint was written with one "
                        "(deleted or copied incompletely)")
    return problems


def verify_checkpoint(folder: Path) -> list[str]:
    """Every reason not to trust checkpoint ``folder``, one human-readable line each (empty: it is good).

    Checks the manifest (each listed file present with its size and sha256, the required files listed), then
    that every file parses (adapter, optimizer state, trainer state) and that no tensor holds NaN/inf. Each
    line starts with the file's name; each file gets at most one line. A checkpoint written before manifests
    (no manifest.json and no ``manifest_version`` in its trainer state) is judged by the parse and NaN/inf
    checks only. Files the manifest does not list are never read and not judged. Never raises.
    """
    folder = Path(folder)
    try:
        return _verify(folder)
    except Exception as e:  # whatever the folder holds, verification answers instead of raising
        return [f"{folder.name}: cannot be verified ({_short(e)})"]


def latest_good_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(the newest checkpoint under ``root`` that verifies or None, [(newer rejected checkpoint, its problems)])."""
    rejected = []
    for folder in reversed(list_checkpoints(Path(root))):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder, rejected
        rejected.append((folder, problems))
    return None, rejected


def resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint a resume starts from: the newest under ``root`` that verifies (None when there is none).

    Logs one warning line per problem of each newer, rejected checkpoint. Raises CheckpointError (one line:
    what is wrong, what to do) when there are checkpoints but none verifies.
    """
    good, rejected = latest_good_checkpoint(root)
    for folder, problems in rejected:
        for problem in problems:
            log.warning("checkpoint %s rejected: %s", folder, problem)
    if good is None and rejected:
        newest, problems = rejected[0]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(root, f"no checkpoint verifies, so the run cannot be resumed (newest, {newest.name}: "
                                    f"{problems[0]}{more})",
                              fix="start over in a new training.output_dir, or move the checkpoints folder away "
                                  "to retrain from step 0 here")
    if rejected:
        log.warning("resuming from %s, the newest checkpoint that verifies", good)
    return good
