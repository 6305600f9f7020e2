"""The run folder: recognisably ours (a marker), never trained over by accident, user files never deleted.

A run writes ``.qlora-kit-run.json`` first. Training into a non-empty folder without it is refused unless
``overwrite``; then whatever the run would replace (``config.yaml``, ``adapter/``, ...) is first moved aside
to ``NAME.before-qlora-kit``. A completed run is never trained over without ``overwrite``; resuming it is a
no-op unless the config asks for more steps than were done. Folders the run rewrites (``adapter/``, ``best_adapter/``) keep any file the new version lacks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.atomic import atomic_write_json
from qlora_kit.config import ConfigError
from qlora_kit.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    resume_checkpoint,
    verify_checkpoint,
)

log = logging.getLogger("qlora_kit")

MARKER = ".qlora-kit-run.json"
# everything a run writes at the top of its folder
OUTPUTS = ("config.yaml", "run_info.json", "metrics.jsonl", "summary.json", "loss.png", "adapter", "best_adapter",
           "checkpoints", ".offload", "reference_logps.safetensors", "tracking")
FINISHED = ("completed", "early_stopped")


@dataclass
class RunFolder:
    """What ``check_run_folder`` found and decided."""

    path: Path  # training.output_dir
    resume_from: Path | None = None  # the checkpoint to resume from
    finished: dict | None = None  # resume: summary.json of a finished run (nothing to do unless it asks for more steps)
    foreign: bool = False  # overwrite into a non-empty folder that is not a qlora-kit run
    replace_own: bool = False  # overwrite an earlier qlora-kit run in this folder


def read_summary(out: Path) -> dict | None:
    """The run's summary.json, or None when missing or unreadable."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _finished_summary(out: Path, ckpt: Path | None) -> dict | None:
    """summary.json of a finished run whose outputs are still whole (its last checkpoint, verified, and adapter)."""
    summary = read_summary(out)
    if not summary or summary.get("status") not in FINISHED or ckpt is None or not (out / "adapter").is_dir():
        return None
    if verify_checkpoint(ckpt):  # damaged since: resume goes through resume_checkpoint, which says what is wrong
        return None
    return summary if load_trainer_state(ckpt).get("step") == summary.get("steps") else None


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> RunFolder:
    """Decide how a run may use ``out`` without touching it; raises ConfigError with the way out."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", out)
        return RunFolder(out)
    if not out.is_dir():
        raise ConfigError(f"training.output_dir {str(out)!r} is a file; choose a folder")
    ckpt = latest_checkpoint(out / "checkpoints")
    ours = (out / MARKER).is_file() or (resume and ckpt is not None)  # the latter: runs from before the marker
    if not ours:
        if not overwrite:
            raise ConfigError(f"training.output_dir {str(out)!r} is not empty and holds no qlora-kit run (no {MARKER}); "
                              "choose a new or empty folder, or pass --overwrite to write into it (files there that "
                              "the run would replace are moved aside to NAME.before-qlora-kit, nothing is deleted)")
        return RunFolder(out, foreign=True)
    if overwrite:
        return RunFolder(out, replace_own=True)
    summary = _finished_summary(out, ckpt)
    if summary is not None:
        if resume:
            return RunFolder(out, resume_from=ckpt, finished=summary)
        raise ConfigError(f"training.output_dir {str(out)!r} holds a finished run ({summary['status']}, "
                          f"{summary.get('steps')} steps); choose another output_dir, or pass --overwrite to train it "
                          "again from scratch")
    if ckpt is not None and not resume:
        raise ConfigError(f"training.output_dir {str(out)!r} already holds a run (checkpoint {ckpt.name}); pass "
                          "--resume to continue it, --overwrite to start it again, or choose another output_dir")
    if resume and ckpt is None:
        log.info("--resume: no checkpoint in %s yet; starting from step 0", out)
    return RunFolder(out, resume_from=resume_checkpoint(out / "checkpoints") if resume and ckpt else None)


def _aside(path: Path) -> Path:
    """A free name ``NAME.before-qlora-kit[-N]`` beside ``path``."""
    target, n = path.with_name(f"{path.name}.before-qlora-kit"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.before-qlora-kit-{n}")
    return target


def claim_run_folder(plan: RunFolder) -> None:
    """Make the folder ours (main process only): move foreign outputs aside, clear our old run, write the marker."""
    out = plan.path
    out.mkdir(parents=True, exist_ok=True)
    if plan.foreign:
        for name in OUTPUTS:
            if (out / name).exists() or (out / name).is_symlink():
                kept = _aside(out / name)
                os.replace(out / name, kept)
                log.warning("--overwrite: moved %s aside to %s (it was not written by qlora-kit)", out / name, kept.name)
    if plan.replace_own:  # only what an earlier run wrote: its step-* checkpoints and its verdict
        for old in list_checkpoints(out / "checkpoints"):
            trash = old.with_name(f".{old.name}.deleting")
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        (out / "summary.json").unlink(missing_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_json(out / MARKER, {"tool": "qlora-kit", "version": 1,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def replace_keeping_foreign(target: Path, write: Callable[[Path], None]) -> None:
    """Rewrite folder ``target`` with ``write(target)``; files of the old folder the new one lacks are kept.

    The old folder is renamed aside first (so nothing is lost if ``write`` fails: it is put back), then its
    entries that the new folder does not have (a user's notes, say) are moved in, and the rest removed.
    """
    prev = target.with_name(f".{target.name}.prev-{os.getpid()}") if target.is_dir() else None
    if prev is not None:
        os.replace(target, prev)
    try:
        write(target)
    except BaseException:
        if prev is not None and not target.exists():
            os.replace(prev, target)
        raise
    if prev is not None:
        for entry in prev.iterdir():
            if not (target / entry.name).exists():
                os.replace(entry, target / entry.name)
        shutil.rmtree(prev, ignore_errors=True)


def write_summary(out: Path, result) -> None:
    """Write ``summary.json`` from a TrainResult and log its short human version."""
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    summary["tokens_per_s"] = round(result.tokens_per_s, 2)
    atomic_write_json(out / "summary.json", summary)
    lines = [(f"{result.status}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s "
              f"({result.tokens_per_s:.0f} tokens/s), peak memory {result.peak_memory_mb:.0f} MB")]
    if result.best_eval_loss is not None:
        last = f"validation loss {result.eval_loss:.4f} " if result.eval_loss is not None else ""
        lines.append(f"{last}(best {result.best_eval_loss:.4f})")
    if result.eval_pairs:
        e = result.eval_pairs
        lines.append(f"validation pairs: reward chosen {e['eval_reward_chosen']:.3f}, rejected "
                     f"{e['eval_reward_rejected']:.3f}, margin {e['eval_reward_margin']:.3f}, preference accuracy "
                     f"{e['eval_pref_accuracy']:.0%}")
    if result.best_exact_match is not None:
        last = f"held-out exact match {result.eval_exact_match:.1%} " if result.eval_exact_match is not None else ""
        lines.append(f"{last}(best {result.best_exact_match:.1%})")
    if result.best_step is not None:
        lines.append(f"best_adapter/: step {result.best_step}, the best by {result.best_metric}")
    if result.adapter_dir:
        lines.append(f"adapter: {result.adapter_dir}   plot: {out / 'loss.png'}   metrics: {out / 'metrics.jsonl'}")
    log.info("\n".join(lines))
