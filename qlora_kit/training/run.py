"""What the recipe's steps share: the run (its parts and its progress), its result, and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.config import TrainConfig
from qlora_kit.data.prepare import DataStats, Prepared
from qlora_kit.training.health import HealthMonitor
from qlora_kit.training.metrics import MetricsLog
from qlora_kit.training.recovery import Recovery


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
    best_step: int | None  # the step of the best training.best_metric value: the adapter in best_adapter/
    stopped_because: str | None = None  # status "diverged": the one-line reason
    eval_pairs: dict | None = None  # dpo/orpo: the last evaluation's eval_reward_chosen, eval_reward_rejected, eval_reward_margin, eval_pref_accuracy
    eval_exact_match: float | None = None  # held-out greedy exact match at the end (training.eval_generate_every)
    best_exact_match: float | None = None  # best held-out exact match seen
    best_metric: str = "eval_loss"  # training.best_metric: what best_step and best_adapter/ are the best by

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Schedule:
    """How the training data maps onto optimizer steps in this launch."""

    world: int  # processes in the launch (1 without torchrun/accelerate launch)
    micro_per_step: int  # micro-batches one optimizer step consumes over all ranks: grad_accum x world
    steps_per_epoch: int  # optimizer steps in one pass over the data
    total_steps: int  # training.max_steps, or epochs x steps_per_epoch


@dataclass
class Progress:
    """How far the run got: the counters a checkpoint saves and a resume restores, and how it ends."""

    done: int = 0  # optimizer steps done (resumed ones included)
    tokens: int = 0  # non-padding tokens processed, all ranks, all sessions
    supervised_tokens: int = 0  # tokens that carried a label, all ranks, all sessions
    seconds: float = 0.0  # wall time of the accepted training steps, all sessions
    best_eval_loss: float | None = None  # best validation loss so far
    best_step: int | None = None  # the step of the best training.best_metric value so far
    bad_evals: int = 0  # evaluations of training.best_metric since its best one (early stopping)
    best_exact_match: float | None = None  # best held-out exact match so far (training.eval_generate_every)
    eval_exact_match: float | None = None  # the latest held-out exact match
    saved_at: int = -1  # the step of the newest checkpoint written or resumed from in this session
    status: str = "completed"  # becomes "early_stopped", "interrupted" or "diverged"
    last_loss: float | None = None  # loss of the last accepted step
    eval_loss: float | None = None  # the latest validation loss
    eval_pairs: dict | None = None  # dpo/orpo: the latest evaluation's pair metrics (eval_-prefixed means)
    stopped_because: str | None = None  # status "diverged": the one-line reason


@dataclass
class Run:
    """The parts of a run that ``setup`` built, plus its progress; each recipe step reads and updates it."""

    config: TrainConfig  # the validated config
    out: Path  # the run folder (training.output_dir)
    accelerator: Any  # accelerate.Accelerator: device, process index, collectives
    schedule: Schedule  # step counts
    tokenizer: Any  # the checkpoint's tokenizer (pad token set)
    train_set: Prepared  # the prepared training examples (preference pairs for dpo/orpo)
    eval_set: Prepared  # the prepared validation examples (may be empty)
    stats: DataStats  # counts and token lengths of the prepared data
    checkpointing: bool  # gradient checkpointing on
    fsdp: bool  # several processes under training.distributed=fsdp
    core: nn.Module  # the 4-bit model with its LoRA adapters, unwrapped
    step_fn: nn.Module  # SupervisedLoss/PreferenceLoss over core, as accelerate prepared it (DDP/FSDP wrapper, or itself)
    optimizer: Any  # the optimizer over params (accelerate-wrapped)
    params: list[torch.Tensor]  # the trainable (LoRA) parameters
    named: Any  # core, or under FSDP a view of it under the original module names (adapter files, resume)
    monitor: HealthMonitor  # loss / gradient / weight checks
    recovery: Recovery  # what to do about a problem: skip, roll back or stop
    progress: Progress = field(default_factory=Progress)  # counters and status
    metrics: MetricsLog | None = None  # metrics.jsonl, opened once the run's records are written
    bar: Any = None  # the tqdm progress bar of the training loop
    epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict)  # the current epoch's micro-batches
    compiled: bool | None = None  # decoder layers under torch.compile (None: not decided yet; a resume keeps the saved choice)
    reference: Any = None  # dpo with cached reference log-probs: reference_cache.ReferenceLogps; None: live
    start_adapter: str = ""  # sha256 of model.adapter's files ("" without one): a resume must start from the same
    eval_records: list[dict] = field(default_factory=list)  # held-out records for exact match (eval_generate_every)

    @property
    def main(self) -> bool:
        """This process writes the run folder (rank 0)."""
        return self.accelerator.is_main_process

    def trainer_state(self) -> dict:
        """The JSON state a checkpoint saves beside the adapter and the optimizer (``trainer_state.json``)."""
        p = self.progress
        return {"best_eval_loss": p.best_eval_loss, "best_step": p.best_step, "bad_evals": p.bad_evals,
                "best_exact_match": p.best_exact_match,
                "world_size": self.schedule.world, "micro_batches_per_step": self.schedule.micro_per_step,
                "sharded": self.fsdp, "tokens": p.tokens, "supervised_tokens": p.supervised_tokens,
                "seconds": p.seconds, "health": self.monitor.state(), "recovery": self.recovery.state(),
                "cpu_threads": torch.get_num_threads(), "compiled": self.compiled,
                "start_adapter": self.start_adapter}
