"""The training loop: token-normalised accumulation, checkpoints and exact resume, evaluation, outputs.

One optimizer step consumes ``grad_accum * world_size`` micro-batches. Every rank knows the whole group,
so the number of supervised tokens is global by construction and each micro-batch's loss is
``sum of token losses / tokens in the whole step``: k micro-batches give exactly the gradient of one big
batch. The random state is re-seeded from (seed, step) at every step, so a resumed run replays the
interrupted one bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from qlora_kit.model.adapters import assign_adapter, save_adapter
from qlora_kit.training.checkpoint import load_optimizer_state, load_trainer_state, read_checkpoint_adapter, save_checkpoint
from qlora_kit.config import ConfigError, TrainConfig, to_dict
from qlora_kit.data.batching import collate, make_batches
from qlora_kit.data.contract import save_contract
from qlora_kit.data.tokenize import Example
from qlora_kit.training.health import HealthMonitor, largest_weight
from qlora_kit.training.loss import causal_lm_loss
from qlora_kit.model.lora import add_lora, inference_rank, sample_rank, set_rank
from qlora_kit.training.metrics import MetricsLog, peak_rss_mb
from qlora_kit.model.load import load_model, set_gradient_checkpointing
from qlora_kit.training.optim import build_optimizer, lr_at, set_lr
from qlora_kit.training.recovery import Recovery
from qlora_kit.training.run_folder import check_run_folder, claim_run_folder, replace_keeping_foreign, write_summary

log = logging.getLogger("qlora_kit")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss, a bad resume); the message names the step and the way out."""


class RunDiverged(TrainingError):
    """The run was stopped as broken (non-finite, diverged, dead, exploded); summary.json says "diverged"."""

    exit_code = 4  # the CLI's exit status (2 is bad input)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced and measured."""

    output_dir: Path  # the run folder
    adapter_dir: Path | None  # the final adapter (None when interrupted: see the last checkpoint)
    status: str  # "completed", "early_stopped", "interrupted" or "diverged"
    steps: int  # optimizer steps done in total
    tokens: int  # non-padding tokens processed over the whole run (all sessions, resumes included)
    supervised_tokens: int  # tokens that carried a label, over the whole run
    seconds: float  # wall time of the training steps, over the whole run
    peak_memory_mb: float  # peak RSS on CPU (includes mapped weight files), peak allocated on CUDA
    final_train_loss: float | None  # mean loss of the last logged step
    eval_loss: float | None  # validation loss at the end
    best_eval_loss: float | None  # best validation loss seen
    best_step: int | None  # the step of the best validation loss
    stopped_because: str | None = None  # status "diverged": the one-line reason

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resolve_model_path(path: str) -> Path:
    """``"demo"`` names the cached SmolLM2-135M-Instruct; anything else is a local folder."""
    if path == "demo":
        from qlora_kit.demo.model import demo_model_path

        return demo_model_path()
    return Path(path)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("\n%s received: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class SupervisedLoss(torch.nn.Module):
    """The model plus its loss as one module, so DDP's forward (and gradient sync) wraps the whole step."""

    def __init__(self, model: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies over the batch's supervised positions (0-dim)."""
        return causal_lm_loss(self.model, batch, self.chunk_size)[0]


def accumulate_gradients(step_fn: torch.nn.Module, accelerator, micro_batches: list[dict], step_tokens: int) -> float:
    """Backward over this rank's micro-batches, each loss divided by the step's global supervised tokens.

    ``step_tokens`` counts supervised tokens over every rank's micro-batches of the step, so the summed
    gradient equals that of one big batch (not a mean of micro-batch means). Returns this rank's loss sum.
    """
    world = accelerator.num_processes
    total = 0.0
    for j, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = j == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(step_fn):
            loss_sum = step_fn(**batch)
            # DDP averages gradients over ranks, hence * world: the result is sum / global tokens
            accelerator.backward(loss_sum * (world / max(step_tokens, 1)))
        total += loss_sum.item()
    return total


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int, pad_id: int, max_seq_len: int,
                  chunk: int = 1024) -> float:
    """Mean cross-entropy per supervised token over ``examples`` (batched, sorted by length)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id, False, max_seq_len)
        loss_sum, n = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}, chunk)
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def _gradient_checkpointing(config: TrainConfig, model_path: Path, seq_len: int, device: torch.device) -> bool:
    """"on"/"off" as configured; "auto" turns it on when the plan without it exceeds 80% of free memory."""
    choice = config.training.gradient_checkpointing
    if choice != "auto":
        return choice == "on"
    from qlora_kit.planning.fit import plan_run
    from qlora_kit.hardware import available_memory

    plan = plan_run(config, model_path, seq_len, device, grad_checkpointing=False)
    need, have = plan.total, available_memory(device)
    log.info("gradient checkpointing auto: the plan without it needs %.1f GiB of %.1f GiB available -> %s",
             need / 2**30, have / 2**30, "on" if need > 0.8 * have else "off")
    return need > 0.8 * have


def _finished_result(out: Path, summary: dict) -> TrainResult:
    """The TrainResult of a finished run, from its summary.json (``--resume`` with no more steps to do)."""
    log.info("%s: the run is already %s (%s steps); nothing to train. Raise training.max_steps to train longer, "
             "or pass --overwrite to train it again",
             out, summary["status"], summary.get("steps"))
    fields = {f.name: summary.get(f.name) for f in dataclasses.fields(TrainResult)}
    fields.update(output_dir=out, adapter_dir=Path(fields["adapter_dir"]) if fields["adapter_dir"] else None)
    return TrainResult(**fields)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, model=None, tokenizer=None,
          force: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune ``config.model.path`` with LoRA on ``config.data`` and write the run to ``output_dir``.

    Everything is validated (config, model folder, every data record, the output folder) before the model is
    loaded. ``model``/``tokenizer`` may be passed in already loaded (4-bit, without adapters). ``overwrite``
    lets the run use a non-empty folder or restart a finished one (see run_folder.py); ``force`` runs even
    when the memory plan needs far more than is available (see ``fit_check``). Returns a TrainResult;
    raises ConfigError/DataError for bad input and RunDiverged (a TrainingError) when the health checks stop
    the run (``training.on_nonfinite``).
    """
    from qlora_kit.training.distributed import (adapter_view, clip_grad_norm, configure_quant_for_fsdp, evaluate_sharded,
                              full_adapter_params, gathered_optimizer, load_optimizer, make_accelerator,
                              quiet_other_ranks, wrap_fsdp)
    from qlora_kit.training.validate import validate_run

    quiet_other_ranks()
    checked = validate_run(config, tokenizer, force)  # config, model folder, LoRA targets, every record; no weights
    tc, out, model_path = config.training, Path(config.training.output_dir), checked.model_path
    folder = check_run_folder(out, resume, overwrite)
    resume_from = folder.resume_from
    tokenizer, train_set, eval_set, stats = checked.tokenizer, checked.train_set, checked.eval_set, checked.stats

    accelerator = make_accelerator(cpu=config.model.device == "cpu")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    fsdp = world > 1 and tc.distributed == "fsdp"
    micro_per_step = tc.grad_accum * world
    batches_per_epoch = len(make_batches(train_set, tc.batch_size, config.data, tc.seed, 0))
    steps_per_epoch = batches_per_epoch // micro_per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {len(train_set)} examples make {batches_per_epoch} micro-batches, fewer than one "
                          f"optimizer step needs ({tc.grad_accum} x {world} ranks); lower training.batch_size or grad_accum")
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    if folder.finished is not None and (folder.finished["status"] != "completed" or folder.finished["steps"] >= total_steps):
        return _finished_result(out, folder.finished)
    if main:  # before the model loads (model.offload writes .offload/ here)
        claim_run_folder(folder)
    longest = max(len(e.input_ids) for e in train_set)
    checkpointing = _gradient_checkpointing(config, model_path, min(longest, config.data.max_seq_len),
                                           accelerator.device)
    if fsdp:
        from qlora_kit.hardware import choose_compute_dtype

        configure_quant_for_fsdp(config, choose_compute_dtype(config.model.compute_dtype, accelerator.device))
    if model is None:  # under FSDP every rank quantizes on the CPU and FSDP moves each unit's shard to the device
        model, _ = load_model(model_path, config.quant, config.model.compute_dtype, checkpointing,
                              device="cpu" if fsdp else str(accelerator.device),
                              trust_remote_code=config.model.trust_remote_code,
                              offload=config.model.offload, offload_folder=out / ".offload")
    else:
        set_gradient_checkpointing(model, checkpointing)
    torch.manual_seed(tc.seed)
    add_lora(model, config.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    core = model
    if fsdp:  # wrapped before the optimizer exists; use_orig_params keeps ``params`` the optimizer's tensors
        step_fn = wrap_fsdp(accelerator, SupervisedLoss(model, tc.loss_chunk_size), model)
        optimizer = accelerator.prepare(build_optimizer(params, tc, accelerator.device))
        named = adapter_view(core, step_fn)  # adapter files and resume use the original module names
    else:
        optimizer = build_optimizer(params, tc, accelerator.device)
        step_fn, optimizer = accelerator.prepare(SupervisedLoss(model, tc.loss_chunk_size), optimizer)
        named = core

    state = {"best_eval_loss": None, "best_step": None, "bad_evals": 0, "world_size": world,
             "micro_batches_per_step": micro_per_step, "sharded": fsdp}
    start_step, tokens, supervised, seconds = 0, 0, 0, 0.0
    monitor = HealthMonitor(core.config.vocab_size)
    recovery = Recovery(tc.on_nonfinite, out / "checkpoints", monitor.limits)

    def restore(ckpt: Path) -> None:  # the adapter and optimizer state of a checkpoint
        with full_adapter_params(step_fn):
            assign_adapter(named, read_checkpoint_adapter(ckpt))
        load_optimizer(step_fn, optimizer, load_optimizer_state(ckpt))

    if resume_from is not None:
        saved = load_trainer_state(resume_from)
        if saved.get("micro_batches_per_step") != micro_per_step:
            raise TrainingError(
                f"{resume_from}: saved with {saved.get('micro_batches_per_step')} micro-batches per step "
                f"(grad_accum x world size), this launch has {micro_per_step}; resume with the same product "
                "(e.g. double grad_accum when halving the number of processes)")
        if saved.get("sharded"):  # FSDP checkpoints hold the adapter but not the (sharded) optimizer state
            raise TrainingError(f"{resume_from}: written under training.distributed=fsdp, which does not save the "
                                "optimizer state, so it cannot be resumed exactly; use its adapter_model.safetensors, "
                                "or train with ddp when you need resumable checkpoints")
        restore(resume_from)
        state.update({k: saved[k] for k in ("best_eval_loss", "best_step", "bad_evals") if k in saved})
        start_step = saved["step"]
        tokens, supervised, seconds = saved.get("tokens", 0), saved.get("supervised_tokens", 0), saved.get("seconds", 0.0)
        monitor.load(saved.get("health", {}))
        recovery.load(saved.get("recovery", {}))
        log.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)

    if main:
        _write_run_info(out, config, stats, world, checkpointing)
    metrics = MetricsLog(out / "metrics.jsonl", start_step, enabled=main)
    epoch_cache: dict[int, list[list[int]]] = {}
    pad_id = tokenizer.pad_token_id
    status, last_loss, eval_loss, stopped_because = "completed", None, None, None

    def step_group(step: int) -> list[list[int]]:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = make_batches(train_set, tc.batch_size, config.data, tc.seed, epoch)
        return epoch_cache[epoch][k * micro_per_step:(k + 1) * micro_per_step]

    def checkpoint(step: int) -> None:
        state.update(tokens=tokens, supervised_tokens=supervised, seconds=seconds, health=monitor.state(),
                     recovery=recovery.state())
        accelerator.wait_for_everyone()
        with full_adapter_params(step_fn):  # collective under FSDP; only the main process writes
            opt = gathered_optimizer(step_fn, optimizer)
            if main:
                save_checkpoint(out / "checkpoints", step, named, opt, state, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not (progress and main), dynamic_ncols=True)
    done, saved_at = start_step, start_step if resume_from is not None else -1
    core.train()
    with _StopFlag() as stop:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(tc.seed, step))
            sampled_rank = None
            if config.lora.dynamic_rank:
                sampled_rank = sample_rank(random.Random(_step_seed(tc.seed, step)), config.lora)
                set_rank(core, sampled_rank)
            group = [[train_set[i] for i in b] for b in step_group(step)]
            collated = [collate(examples, pad_id, config.data.packing, config.data.max_seq_len) for examples in group]
            step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in collated)  # global, all ranks
            loss_total = accumulate_gradients(step_fn, accelerator, collated[rank::world], step_tokens)
            step_input = sum(len(e.input_ids) for b in group[rank::world] for e in b)
            stopping = stop.signal is not None
            if world > 1:  # one all-reduce: loss, tokens, and whether any rank was asked to stop
                summed = accelerator.reduce(torch.tensor([loss_total, step_input, float(stopping)],
                                                         dtype=torch.float64, device=accelerator.device), "sum")
                loss_total, step_input, stopping = summed[0].item(), int(summed[1].item()), bool(summed[2].item())
            tokens += step_input
            supervised += step_tokens
            step_loss = loss_total / max(step_tokens, 1)
            norm = clip_grad_norm(step_fn, params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
            problem = monitor.check_step(step + 1, step_loss, float(norm))
            if problem is None:
                lr = lr_at(step, total_steps, tc)
                set_lr(optimizer, lr)
                optimizer.step()
                problem = monitor.check_weights(step + 1, _largest_weight(params, accelerator))
            optimizer.zero_grad(set_to_none=True)
            if problem is not None:
                action, good, message = recovery.decide(problem)
                if action == "stop":
                    status, stopped_because = "diverged", message
                    break
                log.warning(message)
                done = step + 1
                if action == "rollback":
                    restore(good)
                    monitor.forget_after(load_trainer_state(good)["step"])
                    checkpoint(done)  # the newest checkpoint holds good weights again (a resume starts from them)
                    saved_at = done
                bar.update(1)
                continue
            recovery.accepted()
            seconds += time.perf_counter() - t0
            last_loss = step_loss
            done = step + 1
            record = {"step": done, "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(float(norm), 6),
                      "tokens_per_s": round(tokens / seconds, 2), "supervised_tokens": step_tokens}
            if sampled_rank is not None:
                record["rank"] = sampled_rank
            if done % tc.log_every == 0 or done == total_steps:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            last = done == total_steps
            if eval_set and ((tc.eval_every and done % tc.eval_every == 0) or last):
                set_rank(core, inference_rank(config.lora))  # lora.active_rank, r by default
                eval_loss = (evaluate_sharded(step_fn, eval_set, tc.batch_size, pad_id, config.data.max_seq_len,
                                              accelerator.device) if fsdp else
                             evaluate_loss(core, eval_set, tc.batch_size, pad_id, config.data.max_seq_len,
                                           tc.loss_chunk_size))
                core.train()
                improved = state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]
                if improved:
                    state.update(best_eval_loss=eval_loss, best_step=done, bad_evals=0)
                    with full_adapter_params(step_fn):
                        if main:
                            replace_keeping_foreign(out / "best_adapter", lambda d: (
                                save_adapter(named, d), save_contract(tokenizer, d, model_path)))
                else:
                    state["bad_evals"] += 1
                metrics.write({"step": done, "eval_loss": round(eval_loss, 6)})
                if main:
                    bar.write(f"step {done}: validation loss {eval_loss:.4f}" + (" (best)" if improved else ""))
                if tc.early_stopping_patience and state["bad_evals"] >= tc.early_stopping_patience:
                    status = "early_stopped"
            if world == 1:  # several ranks act on the flag all-reduced above, so all stop after the same step
                stopping = stop.signal is not None
            if (tc.save_every and done % tc.save_every == 0) or stopping or status != "completed":
                checkpoint(done)
                saved_at = done
            if stopping:
                status = "interrupted"
            if status != "completed":
                break
    bar.close()
    set_rank(core, inference_rank(config.lora))
    adapter_dir = None
    if status == "interrupted":
        log.warning("interrupted at step %d; checkpoint saved. Resume with: qlora-kit train CONFIG.yaml --resume "
                    "training.output_dir=%s", done, out)
    elif status != "diverged":
        if saved_at != done:
            checkpoint(done)
        with full_adapter_params(step_fn):
            if main:
                replace_keeping_foreign(out / "adapter", lambda d: (save_adapter(named, d),
                                                                    save_contract(tokenizer, d, model_path)))
        accelerator.wait_for_everyone()
        adapter_dir = out / "adapter"
    result = TrainResult(out, adapter_dir, status, done, tokens, supervised, seconds, _peak_memory_mb(),
                         last_loss, eval_loss, state["best_eval_loss"], state["best_step"], stopped_because)
    if main:
        metrics.plot(out / "loss.png")
        write_summary(out, result)
    if stopped_because is not None:
        raise RunDiverged(stopped_because)
    return result


def _largest_weight(params: list[torch.Tensor], accelerator) -> float:
    """The adapter weights' largest magnitude; summed over ranks (same decision everywhere; an upper bound)."""
    largest = largest_weight(params)
    if accelerator.num_processes > 1:
        largest = accelerator.reduce(torch.tensor([largest], dtype=torch.float64, device=accelerator.device), "sum").item()
    return largest


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for pkg in ("qlora-kit", "torch", "transformers", "bitsandbytes", "accelerate", "safetensors"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found


def _write_run_info(out: Path, config: TrainConfig, stats, world: int, checkpointing: bool) -> None:
    from qlora_kit.atomic import atomic_write_bytes, atomic_write_json

    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    atomic_write_json(out / "run_info.json", {"versions": _versions(), "seed": config.training.seed,
                                              "world_size": world, "gradient_checkpointing": checkpointing,
                                              "data": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else stats})
