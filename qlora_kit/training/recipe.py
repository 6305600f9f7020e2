"""The training recipe: ``train()`` as a list of steps, and the steps that decide what happens after an update.

setup (validate, run folder, schedule, model, LoRA, optimizer; ``setup.py``) -> resume (``setup.resume_run``) ->
per step: ``step.optimizer_step`` (micro-batches, token-normalised accumulation, the health guard), then
``recover`` (a problem: skip, roll back or stop) or ``accept`` (counters, metrics), ``maybe_evaluate`` and
``maybe_checkpoint`` -> ``outputs.finish`` (adapter, summary, plot).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from qlora_kit.config import TrainConfig
from qlora_kit.data.batching import collate_pairs
from qlora_kit.model.compile import compiled_for_training, eager
from qlora_kit.model.lora import inference_rank, set_rank
from qlora_kit.training.checkpoint import load_trainer_state
from qlora_kit.training.distributed import make_accelerator, quiet_other_ranks
from qlora_kit.training.evaluate import evaluate_loss
from qlora_kit.training.generation_metrics import held_out_exact_match, update_best
from qlora_kit.training.health import Problem
from qlora_kit.training.objectives import evaluate_preference
from qlora_kit.training.outputs import checkpoint, finish, save_best_adapter, start_records
from qlora_kit.training.reference_cache import attach, prepare_reference
from qlora_kit.training.run import Run, TrainResult
from qlora_kit.training.run_folder import check_run_folder
from qlora_kit.training.setup import (
    finished_result,
    plan_schedule,
    restore,
    resume_run,
    setup,
)
from qlora_kit.training.step import StepOutcome, StopFlag, optimizer_step
from qlora_kit.training.tracking import accelerator_kwargs
from qlora_kit.training.validate import validate_run

log = logging.getLogger("qlora_kit")


def train(config: TrainConfig, resume: bool = False, progress: bool = True, model=None, tokenizer=None,
          force: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune ``config.model.path`` with LoRA on ``config.data`` and write the run to ``output_dir``.

    Everything is validated (config, model folder, every data record, the output folder) before the model is
    loaded. ``model``/``tokenizer`` may be passed in already loaded (4-bit, without adapters). ``overwrite``
    lets the run use a non-empty folder or restart a finished one (see run_folder.py); ``force`` runs even
    when the memory plan needs far more than is available (see ``planning.fit``). Returns a TrainResult;
    raises ConfigError/DataError for bad input and RunDiverged (a TrainingError) when the health checks stop
    the run (``training.on_nonfinite``).
    """
    quiet_other_ranks()
    checked = validate_run(config, tokenizer, force)  # config, model folder, LoRA targets, every record; no weights
    config = checked.config  # with model.adapter: its LoRA settings
    log.info("%s", checked.summary())  # model, LoRA targets, data counts and lengths, prompt: said once, here
    folder = check_run_folder(Path(config.training.output_dir), resume, overwrite)
    accelerator = make_accelerator(cpu=config.model.device == "cpu", **accelerator_kwargs(config))
    schedule = plan_schedule(config, checked.train_set, accelerator.num_processes)
    done = finished_result(folder, schedule.total_steps)
    if done is not None:
        return done
    run = setup(config, checked, folder, accelerator, schedule, model)
    if folder.resume_from is not None:
        resume_run(run, folder.resume_from)
    if run.compiled is None:  # a resumed run keeps its checkpoint's choice
        run.compiled = config.training.compile == "on"
    start_records(run, progress)
    run.core.train()
    run.reference = prepare_reference(run)  # dpo: the reference log-probs cached once, or None (live)
    with StopFlag() as stop, compiled_for_training(run.core, run.compiled):
        for step in range(run.progress.done, schedule.total_steps):
            outcome = optimizer_step(run, step, stop)
            if outcome.problem is not None:
                if recover(run, step, outcome.problem):
                    continue
                break
            accept(run, step, outcome)
            maybe_evaluate(run)
            if not maybe_checkpoint(run, outcome.stopping if schedule.world > 1 else stop.signal is not None):
                break
    return finish(run)


def recover(run: Run, step: int, problem: Problem) -> bool:
    """Act on a failed health check at step ``step``: skip it, roll back to a good checkpoint, or stop.

    Returns True when the run goes on (the step counts as done, its update dropped); False when it stops
    with status "diverged".
    """
    action, good, message = run.recovery.decide(problem)
    p = run.progress
    if action == "stop":
        p.status, p.stopped_because = "diverged", message
        return False
    log.warning(message)
    p.done = step + 1
    if action == "rollback":
        restore(run, good)
        run.monitor.forget_after(load_trainer_state(good)["step"])
        checkpoint(run)  # the newest checkpoint holds good weights again (a resume starts from them)
    run.bar.update(1)
    return True


def accept(run: Run, step: int, outcome: StepOutcome) -> None:
    """Count an applied step: time, loss, metrics.jsonl (every ``log_every`` steps and the last), progress bar."""
    run.recovery.accepted()
    p, tc = run.progress, run.config.training
    elapsed = time.perf_counter() - outcome.started
    p.seconds += elapsed
    p.last_loss = outcome.loss
    p.done = step + 1
    record = {"step": p.done, "loss": round(outcome.loss, 6), "lr": outcome.lr,
              "grad_norm": round(outcome.grad_norm, 6), "tokens_per_s": round(p.tokens / p.seconds, 2), "supervised_tokens": outcome.supervised_tokens,
              "step_s": round(elapsed, 3)}
    if outcome.rank is not None:
        record["rank"] = outcome.rank
    record.update({k: round(v, 6) for k, v in (outcome.pairs or {}).items()})
    if p.done % tc.log_every == 0 or p.done == run.schedule.total_steps:
        run.metrics.write(record)
    run.bar.update(1)
    shown = pair_postfix(outcome.pairs)
    if p.eval_exact_match is not None:  # the latest held-out exact match (training.eval_generate_every)
        shown["em"] = f"{p.eval_exact_match:.2f}"
    run.bar.set_postfix(loss=f"{outcome.loss:.4f}", **shown, lr=f"{outcome.lr:.2e}",
                        tok_s=f"{p.tokens / p.seconds:.0f}")


def pair_postfix(pairs: dict | None) -> dict[str, str]:
    """The progress bar's short form of a step's pair metrics (empty for sft): rewards of chosen (``r+``) and
    rejected (``r-``) responses, their margin and the preference accuracy."""
    if not pairs:
        return {}
    return {"r+": f"{pairs['reward_chosen']:.3f}", "r-": f"{pairs['reward_rejected']:.3f}",
            "margin": f"{pairs['reward_margin']:.3f}", "acc": f"{pairs['pref_accuracy']:.2f}"}


def maybe_evaluate(run: Run) -> None:
    """Validation loss every ``eval_every`` steps, held-out exact match every ``eval_generate_every``, both at
    the last step; keeps ``best_adapter/`` by ``training.best_metric`` and counts early stopping."""
    p, tc = run.progress, run.config.training
    last = p.done == run.schedule.total_steps
    loss_due = bool(run.eval_set) and (last or bool(tc.eval_every and p.done % tc.eval_every == 0))
    match_due = bool(run.eval_records) and (last or p.done % tc.eval_generate_every == 0)
    if not (loss_due or match_due):
        return
    set_rank(run.core, inference_rank(run.config.lora))  # lora.active_rank, r by default
    record, measured, extra = {"step": p.done}, {}, {}
    with eager():  # compiled layers would recompile for no-grad evaluation and generation
        if loss_due:
            p.eval_loss, extra = validation_loss(run)
            p.eval_pairs = extra or None
            measured["eval_loss"] = p.eval_loss
            record.update({"eval_loss": round(p.eval_loss, 6), **extra})
        if match_due:
            p.eval_exact_match = measured["eval_exact_match"] = held_out_exact_match(run)
            record["eval_exact_match"] = round(p.eval_exact_match, 6)
    run.core.train()
    improved = update_best(run, measured)
    if improved:
        save_best_adapter(run)
    run.metrics.write(record)
    if run.main:
        pairs = (f", reward margin {extra['eval_reward_margin']:.3f}, preference accuracy "
                 f"{extra['eval_pref_accuracy']:.0%}") if extra else ""
        shown = ([f"validation loss {p.eval_loss:.4f}{pairs}"] if loss_due else []) + \
            ([f"exact match {p.eval_exact_match:.1%} on {len(run.eval_records)} held-out"] if match_due else [])
        run.bar.write(f"step {p.done}: {', '.join(shown)}" + (" (best)" if improved else ""))
    if tc.early_stopping_patience and p.bad_evals >= tc.early_stopping_patience:
        p.status = "early_stopped"


def validation_loss(run: Run) -> tuple[float, dict]:
    """The validation loss, and for dpo/orpo the ``eval_``-prefixed reward and accuracy means (rounded)."""
    tc, data, pad_id = run.config.training, run.config.data, run.tokenizer.pad_token_id
    if tc.objective != "sft":
        indices = [list(range(k, min(k + tc.batch_size, len(run.eval_set))))
                   for k in range(0, len(run.eval_set), tc.batch_size)]
        batches = attach([collate_pairs([run.eval_set[i] for i in idx], pad_id, data.max_seq_len) for idx in indices],
                         indices, run.reference, "eval")
        extra = evaluate_preference(run.core, batches, tc)
        return extra.pop("eval_loss"), {k: round(v, 6) for k, v in extra.items()}
    if run.fsdp:
        return evaluate_loss(run.core, run.eval_set, tc.batch_size, pad_id, data.max_seq_len,
                             step_fn=run.step_fn, device=run.accelerator.device), {}
    return evaluate_loss(run.core, run.eval_set, tc.batch_size, pad_id, data.max_seq_len, tc.loss_chunk_size), {}


def maybe_checkpoint(run: Run, stopping: bool) -> bool:
    """Checkpoint every ``save_every`` steps, on a stop signal and when the run ends early; False: stop now.

    ``stopping``: a stop signal arrived (all-reduced over ranks, so every rank stops after the same step).
    """
    p, tc = run.progress, run.config.training
    if (tc.save_every and p.done % tc.save_every == 0) or stopping or p.status != "completed":
        checkpoint(run)
    if stopping:
        p.status = "interrupted"
    return p.status == "completed"
