"""Before the first step: the schedule, the model with its adapters and optimizer, and the resume.

``plan_schedule`` needs no weights, so a finished run or bad sizes are reported before the model loads;
``setup`` claims the run folder, loads the model (or takes the one passed in), adds LoRA and builds the
optimizer; ``resume_run`` restores a verified checkpoint's adapter, optimizer and counters (``restore`` is
also how a rollback goes back to a good checkpoint).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from qlora_kit import hardware
from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.data.batching import make_batches
from qlora_kit.data.preference import longest_row
from qlora_kit.data.prepare import Prepared
from qlora_kit.model.adapters import assign_adapter
from qlora_kit.model.load import load_model, set_gradient_checkpointing
from qlora_kit.model.lora import add_lora
from qlora_kit.planning.fit import plan_run
from qlora_kit.training.checkpoint import load_optimizer_state, load_trainer_state, read_checkpoint_adapter
from qlora_kit.training.distributed import (
    adapter_view,
    configure_quant_for_fsdp,
    full_adapter_params,
    wrap_fsdp,
)
from qlora_kit.training.health import HealthMonitor
from qlora_kit.training.optim import build_optimizer
from qlora_kit.training.recovery import Recovery
from qlora_kit.training.run import Run, Schedule, TrainingError, TrainResult
from qlora_kit.training.run_folder import RunFolder, claim_run_folder
from qlora_kit.training.start_adapter import load_start_weights, start_digest
from qlora_kit.training.step import loss_module
from qlora_kit.training.validate import ValidationReport

log = logging.getLogger("qlora_kit")


def plan_schedule(config: TrainConfig, train_set: Prepared, world: int) -> Schedule:
    """Micro-batches per step, steps per epoch and total steps; raises ConfigError when one step cannot fill."""
    tc = config.training
    micro_per_step = tc.grad_accum * world
    batches_per_epoch = len(make_batches(train_set, tc.batch_size, config.data, tc.seed, 0))
    steps_per_epoch = batches_per_epoch // micro_per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {len(train_set)} examples make {batches_per_epoch} micro-batches, fewer than one "
                          f"optimizer step needs ({tc.grad_accum} x {world} ranks); lower training.batch_size or "
                          "grad_accum")
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    return Schedule(world, micro_per_step, steps_per_epoch, total_steps)


def finished_result(folder: RunFolder, total_steps: int) -> TrainResult | None:
    """``--resume`` of a run with nothing left to do: its TrainResult from summary.json; else None.

    A run is done when it ended other than "completed" (early-stopped, diverged) or has ``total_steps`` already.
    """
    summary = folder.finished
    if summary is None or (summary["status"] == "completed" and summary["steps"] < total_steps):
        return None
    log.info("%s: the run is already %s (%s steps); nothing to train. Raise training.max_steps to train longer, "
             "or pass --overwrite to train it again",
             folder.path, summary["status"], summary.get("steps"))
    fields = {f.name: summary.get(f.name) for f in dataclasses.fields(TrainResult)}
    fields.update(output_dir=folder.path, adapter_dir=Path(fields["adapter_dir"]) if fields["adapter_dir"] else None)
    return TrainResult(**fields)


def choose_gradient_checkpointing(config: TrainConfig, model_path: Path, seq_len: int, device: torch.device) -> bool:
    """"on"/"off" as configured; "auto" turns it on when the plan without it exceeds 80% of free memory."""
    choice = config.training.gradient_checkpointing
    if choice != "auto":
        return choice == "on"
    plan = plan_run(config, model_path, seq_len, device, grad_checkpointing=False)
    need, have = plan.total, hardware.available_memory(device)
    log.info("gradient checkpointing auto: the plan without it needs %.1f GiB of %.1f GiB available -> %s",
             need / 2**30, have / 2**30, "on" if need > 0.8 * have else "off")
    return need > 0.8 * have


def setup(config: TrainConfig, checked: ValidationReport, folder: RunFolder, accelerator, schedule: Schedule,
          model: torch.nn.Module | None = None) -> Run:
    """Claim the run folder, load the 4-bit model (unless passed in), add LoRA, build the optimizer.

    ``model`` may be passed in already loaded (4-bit, without adapters). Under FSDP every rank quantizes on
    the CPU and FSDP moves each unit's shard to the device. Returns the Run at step 0.
    """
    tc, device = config.training, accelerator.device
    if accelerator.is_main_process:  # before the model loads (model.offload writes .offload/ here)
        claim_run_folder(folder)
    if device.type == "cpu":
        hardware.choose_cpu_threads()  # a resumed run goes back to the count its checkpoint saved (resume_run)
    longest = max(longest_row(e) for e in checked.train_set)  # a pair: its longer side (the plan counts 2 rows)
    checkpointing = choose_gradient_checkpointing(config, checked.model_path, min(longest, config.data.max_seq_len),
                                                  device)
    fsdp = schedule.world > 1 and tc.distributed == "fsdp"
    if fsdp and checked.eval_records:
        raise ConfigError("training.eval_generate_every: generation through the FSDP-sharded model is not "
                          "supported yet; set it to 0 (score the adapter with qlora-kit eval after) or use ddp")
    if fsdp:
        configure_quant_for_fsdp(config, hardware.choose_compute_dtype(config.model.compute_dtype, device))
    if model is None:
        model, _ = load_model(checked.model_path, config.quant, config.model.compute_dtype, checkpointing,
                              device="cpu" if fsdp else str(device), trust_remote_code=config.model.trust_remote_code,
                              offload=config.model.offload, offload_folder=folder.path / ".offload")
    else:
        set_gradient_checkpointing(model, checkpointing)
    torch.manual_seed(tc.seed)
    add_lora(model, config.lora)
    load_start_weights(model, config)  # model.adapter's weights; the DPO reference's frozen copy
    params = [p for p in model.parameters() if p.requires_grad]
    if fsdp:  # wrapped before the optimizer exists; use_orig_params keeps ``params`` the optimizer's tensors
        step_fn = wrap_fsdp(accelerator, loss_module(model, tc), model)
        optimizer = accelerator.prepare(build_optimizer(params, tc, device))
    else:
        optimizer = build_optimizer(params, tc, device)
        step_fn, optimizer = accelerator.prepare(loss_module(model, tc), optimizer)
    monitor = HealthMonitor(model.config.vocab_size)
    return Run(config, folder.path, accelerator, schedule, checked.tokenizer, checked.train_set, checked.eval_set,
               checked.stats, checkpointing, fsdp, model, step_fn, optimizer, params, adapter_view(model, step_fn),
               monitor, Recovery(tc.on_nonfinite, folder.path / "checkpoints", monitor.limits),
               start_adapter=start_digest(config), eval_records=checked.eval_records)


def restore(run: Run, ckpt: Path) -> None:
    """Load a checkpoint's adapter and optimizer state into the run (resume, and rollback to a good one)."""
    with full_adapter_params(run.step_fn):
        assign_adapter(run.named, read_checkpoint_adapter(ckpt))
    run.optimizer.load_state_dict(load_optimizer_state(ckpt))


def resume_run(run: Run, ckpt: Path) -> None:
    """Continue from the verified checkpoint ``ckpt``: adapter, optimizer, counters, health and recovery state.

    Raises TrainingError when the checkpoint was written with another number of micro-batches per step, or
    under FSDP (whose checkpoints hold no optimizer state).
    """
    saved, micro = load_trainer_state(ckpt), run.schedule.micro_per_step
    if saved.get("micro_batches_per_step") != micro:
        raise TrainingError(
            f"{ckpt}: saved with {saved.get('micro_batches_per_step')} micro-batches per step "
            f"(grad_accum x world size), this launch has {micro}; resume with the same product "
            "(e.g. double grad_accum when halving the number of processes)")
    if saved.get("sharded"):  # FSDP checkpoints hold the adapter but not the (sharded) optimizer state
        raise TrainingError(f"{ckpt}: written under training.distributed=fsdp, which does not save the "
                            "optimizer state, so it cannot be resumed exactly; use its adapter_model.safetensors, "
                            "or train with ddp when you need resumable checkpoints")
    if saved.get("start_adapter", "") != run.start_adapter:
        raise TrainingError(f"{ckpt}: the run started from another model.adapter (files changed, added or removed "
                            f"since: now {run.config.model.adapter or 'none'}); its DPO reference and starting weights "
                            "would differ. Resume with the adapter the run started from, or start a new run")
    restore(run, ckpt)
    run.compiled = saved.get("compiled")  # the same kernels as before the interruption
    if run.accelerator.device.type == "cpu" and saved.get("cpu_threads"):
        torch.set_num_threads(saved["cpu_threads"])  # the same reductions as before the interruption
    p = run.progress
    for key in ("best_eval_loss", "best_step", "bad_evals", "best_exact_match"):
        if key in saved:
            setattr(p, key, saved[key])
    p.done = p.saved_at = saved["step"]
    p.tokens, p.supervised_tokens = saved.get("tokens", 0), saved.get("supervised_tokens", 0)
    p.seconds = saved.get("seconds", 0.0)
    run.monitor.load(saved.get("health", {}))
    run.recovery.load(saved.get("recovery", {}))
    log.info("resumed from %s at step %d of %d", ckpt, p.done, run.schedule.total_steps)

