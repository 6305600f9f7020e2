"""What a run writes: its records (config.yaml, run_info.json, metrics), checkpoints, adapters (each with the
prompt contract, ``data.contract.save_contract``), summary and plot.

Only the main process writes; the collectives around a write (FSDP gathers the adapter, every rank waits)
run on every rank.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import logging

import torch
import yaml
from tqdm.auto import tqdm

from qlora_kit.atomic import atomic_write_bytes, atomic_write_json
from qlora_kit.config import to_dict
from qlora_kit.data.contract import save_contract
from qlora_kit.model.adapters import save_adapter
from qlora_kit.model.lora import inference_rank, set_rank
from qlora_kit.training.checkpoint import save_checkpoint
from qlora_kit.training.distributed import full_adapter_params, gathered_optimizer
from qlora_kit.training.metrics import MetricsLog, peak_rss_mb
from qlora_kit.training.run import Run, RunDiverged, TrainResult
from qlora_kit.training.run_folder import replace_keeping_foreign, write_summary
from qlora_kit.training.tracking import log_record, start_tracking

log = logging.getLogger("qlora_kit")

_PACKAGES = ("qlora-kit", "torch", "transformers", "bitsandbytes", "accelerate", "safetensors")  # in run_info.json


def start_records(run: Run, progress: bool) -> None:
    """Write config.yaml and run_info.json, open metrics.jsonl (cut back to a resumed step), start the bar."""
    if run.main:
        config, stats = run.config, run.stats
        atomic_write_bytes(run.out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
        atomic_write_json(run.out / "run_info.json", {
            "versions": _versions(), "seed": config.training.seed, "world_size": run.schedule.world,
            "gradient_checkpointing": run.checkpointing,
            "data": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else stats})
    start_tracking(run.accelerator, run.config, run.progress.done)
    run.metrics = MetricsLog(run.out / "metrics.jsonl", run.progress.done, enabled=run.main,
                             on_write=functools.partial(log_record, run.accelerator) if run.accelerator.trackers
                             else None)
    run.bar = tqdm(total=run.schedule.total_steps, initial=run.progress.done, desc="train",
                   disable=not (progress and run.main), dynamic_ncols=True)


def checkpoint(run: Run) -> None:
    """Save a checkpoint of the step ``run.progress.done`` (collective: every rank calls it)."""
    acc, done, keep = run.accelerator, run.progress.done, run.config.training.keep_checkpoints
    state = run.trainer_state()
    acc.wait_for_everyone()
    with full_adapter_params(run.step_fn):  # collective under FSDP; only the main process writes
        opt = gathered_optimizer(run.step_fn, run.optimizer)
        if run.main:
            save_checkpoint(run.out / "checkpoints", done, run.named, opt, state, keep)
    acc.wait_for_everyone()
    run.progress.saved_at = done


def save_best_adapter(run: Run) -> None:
    """Write the current adapter to ``best_adapter/`` (collective under FSDP)."""
    with full_adapter_params(run.step_fn):
        if run.main:
            replace_keeping_foreign(run.out / "best_adapter", lambda d: (
                save_adapter(run.named, d), save_contract(run.tokenizer, d, run.config.model.path)))


def finish(run: Run) -> TrainResult:
    """End the run: final checkpoint and ``adapter/`` unless interrupted or diverged, summary.json, loss.png.

    Returns the TrainResult; raises RunDiverged (after writing the summary) when the health checks stopped it.
    """
    p, out = run.progress, run.out
    run.bar.close()
    set_rank(run.core, inference_rank(run.config.lora))
    adapter_dir = None
    if p.status == "interrupted":
        log.warning("interrupted at step %d; checkpoint saved. Resume with: qlora-kit train CONFIG.yaml --resume "
                    "training.output_dir=%s", p.done, out)
    elif p.status != "diverged":
        if p.saved_at != p.done:
            checkpoint(run)
        with full_adapter_params(run.step_fn):
            if run.main:
                replace_keeping_foreign(out / "adapter", lambda d: (
                    save_adapter(run.named, d), save_contract(run.tokenizer, d, run.config.model.path)))
        run.accelerator.wait_for_everyone()
        adapter_dir = out / "adapter"
    result = TrainResult(out, adapter_dir, p.status, p.done, p.tokens, p.supervised_tokens, p.seconds,
                         _peak_memory_mb(), p.last_loss, p.eval_loss, p.best_eval_loss, p.best_step,
                         p.stopped_because, eval_pairs=p.eval_pairs, eval_exact_match=p.eval_exact_match,
                         best_exact_match=p.best_exact_match, best_metric=run.config.training.best_metric)
    if run.main:
        run.metrics.plot(out / "loss.png", run.config.training)
        write_summary(out, result)
    if run.accelerator.trackers:  # close the trackers' runs (and, with several processes, the process group)
        run.accelerator.end_training()
    if p.stopped_because is not None:
        raise RunDiverged(p.stopped_because)
    return result


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _versions() -> dict:
    found = {}
    for pkg in _PACKAGES:
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found
