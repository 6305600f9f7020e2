"""One optimizer step: the step's micro-batches, token-normalised accumulation, clipping, the health guard.

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
import random
import signal
import time
from dataclasses import dataclass

import torch

from qlora_kit.config import TrainingConfig
from qlora_kit.data.batching import collate, collate_pairs, make_batches
from qlora_kit.data.preference import n_tokens
from qlora_kit.model.lora import sample_rank, set_rank
from qlora_kit.training.distributed import clip_grad_norm
from qlora_kit.training.health import Problem, largest_weight
from qlora_kit.training.loss import causal_lm_loss, supervised_count
from qlora_kit.training.objectives import PairStats, PreferenceLoss
from qlora_kit.training.optim import lr_at, set_lr
from qlora_kit.training.reference_cache import attach
from qlora_kit.training.run import Run

log = logging.getLogger("qlora_kit")


def step_seed(seed: int, step: int) -> int:
    """The seed of optimizer step ``step`` (torch's and the dynamic-rank sampler's): the same on a resume."""
    return (seed * 1_000_003 + step) % (2**63)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None  # the signal received, None until one arrives
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


def loss_module(model: torch.nn.Module, tc: TrainingConfig) -> torch.nn.Module:
    """The step's loss module for ``training.objective``: SupervisedLoss (sft) or PreferenceLoss (dpo, orpo)."""
    return SupervisedLoss(model, tc.loss_chunk_size) if tc.objective == "sft" else PreferenceLoss(model, tc)


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


@dataclass
class StepOutcome:
    """What one optimizer step did and measured."""

    started: float  # time.perf_counter() when the step began
    loss: float  # mean loss per supervised token over the whole step (all ranks)
    grad_norm: float  # the gradient norm before clipping
    supervised_tokens: int  # supervised tokens of the step, all ranks
    pairs: dict | None  # dpo/orpo: the step's reward_chosen, reward_rejected, reward_margin, pref_accuracy (all ranks)
    lr: float | None  # the learning rate applied (None: the step was not applied)
    rank: int | None  # the LoRA rank sampled for this step (dynamic rank), else None
    stopping: bool  # a stop signal reached some rank during the step (all-reduced when several ranks)
    problem: Problem | None  # the health check's finding: the update was not kept


def step_batches(run: Run, step: int) -> list[list[int]]:
    """Indices into ``run.train_set`` of the micro-batches of optimizer step ``step``, every rank's."""
    tc, micro = run.config.training, run.schedule.micro_per_step
    epoch, k = divmod(step, run.schedule.steps_per_epoch)
    if epoch not in run.epoch_batches:
        run.epoch_batches.clear()
        run.epoch_batches[epoch] = make_batches(run.train_set, tc.batch_size, run.config.data, tc.seed, epoch)
    return run.epoch_batches[epoch][k * micro:(k + 1) * micro]


def optimizer_step(run: Run, step: int, stop: StopFlag) -> StepOutcome:
    """Step ``step`` (0-based): seed, forward/backward over the micro-batches, clip, check health, update.

    Counts the step's tokens into ``run.progress`` whether or not the update is kept; the optimizer steps
    only when the loss and gradient norm pass the health checks (``StepOutcome.problem`` says why not).
    """
    config, acc, world = run.config, run.accelerator, run.schedule.world
    started = time.perf_counter()
    torch.manual_seed(step_seed(config.training.seed, step))
    sampled_rank = None
    if config.lora.dynamic_rank:
        sampled_rank = sample_rank(random.Random(step_seed(config.training.seed, step)), config.lora)
        set_rank(run.core, sampled_rank)
    indices = step_batches(run, step)
    group = [[run.train_set[i] for i in b] for b in indices]
    collated = attach(collate_group(run, group), indices, run.reference, "train")  # cached reference log-probs
    step_tokens = sum(supervised_count(b["labels"]) for b in collated)  # global: every rank's micro-batches
    preference = acc.unwrap_model(run.step_fn) if config.training.objective != "sft" else None
    if preference is not None:  # its losses come normalised by the step's totals: divide by 1
        preference.begin_step(collated)
    loss_total = accumulate_gradients(run.step_fn, acc, collated[acc.process_index::world],
                                      step_tokens if preference is None else 1)
    step_input = sum(n_tokens(e) for b in group[acc.process_index::world] for e in b)
    stopping = stop.signal is not None
    pair_sums = dataclasses.astuple(preference.stats) if preference is not None else ()
    if world > 1:  # one all-reduce: loss, tokens, whether any rank was asked to stop, and the pair sums
        summed = acc.reduce(torch.tensor([loss_total, step_input, float(stopping), *pair_sums], dtype=torch.float64,
                                         device=acc.device), "sum")
        loss_total, step_input, stopping = summed[0].item(), int(summed[1].item()), bool(summed[2].item())
        pair_sums = tuple(summed[3:].tolist())
    run.progress.tokens += step_input
    run.progress.supervised_tokens += step_tokens
    loss = loss_total / max(step_tokens, 1) if preference is None else loss_total
    tc = config.training
    norm = float(clip_grad_norm(run.step_fn, run.params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")))
    problem, lr = run.monitor.check_step(step + 1, loss, norm), None
    if problem is None:
        lr = lr_at(step, run.schedule.total_steps, tc)
        set_lr(run.optimizer, lr)
        run.optimizer.step()
        problem = run.monitor.check_weights(step + 1, _largest_weight(run))
    run.optimizer.zero_grad(set_to_none=True)
    pairs = PairStats(int(pair_sums[0]), *pair_sums[1:]).means() if preference is not None else None
    return StepOutcome(started, loss, norm, step_tokens, pairs, lr, sampled_rank, stopping, problem)


def collate_group(run: Run, group: list[list]) -> list[dict]:
    """Each micro-batch as tensors: ``collate`` for sft, ``collate_pairs`` (chosen rows, then rejected) for dpo/orpo."""
    data, pad_id = run.config.data, run.tokenizer.pad_token_id
    if run.config.training.objective == "sft":
        return [collate(examples, pad_id, data.packing, data.max_seq_len) for examples in group]
    return [collate_pairs(pairs, pad_id, data.max_seq_len) for pairs in group]


def _largest_weight(run: Run) -> float:
    """The adapter weights' largest magnitude; summed over ranks (same decision everywhere; an upper bound)."""
    largest = largest_weight(run.params)
    if run.schedule.world > 1:
        acc = run.accelerator
        largest = acc.reduce(torch.tensor([largest], dtype=torch.float64, device=acc.device), "sum").item()
    return largest
