"""Training health: spot a broken run (non-finite, diverged, dead, exploding) from numbers the loop already has.

The monitor is fed every optimizer step's loss and gradient norm (before the update) and the adapter
weights' largest magnitude (after it). It returns a ``Problem`` naming the step and why, or None. Each
problem also says which weights it implicates: a loss measured at step ``s`` was computed with the weights
left by step ``s - 1``, so a diverged loss at ``s`` makes checkpoint ``s - 1`` suspect too.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch


@dataclass
class HealthLimits:
    """Thresholds of the checks (defaults chosen so normal runs, even of random tiny models, never trip)."""

    uniform_margin: float = 0.25  # the loss counts as diverged at >= ln(V) only after it was below (1 - margin) * ln(V)
    spike_factor: float = 4.0  # a loss above spike_factor x the median of recent losses is a spike ...
    spike_min_rise: float = 2.0  # ... if it is also at least this many nats above that median
    spike_window: int = 20  # how many recent accepted losses the median covers
    spike_min_history: int = 5  # no spike check before this many losses were accepted
    dead_steps: int = 3  # a gradient norm of exactly 0 this many steps in a row is dead training
    max_weight: float = 1e4  # an adapter weight larger than this in magnitude counts as exploded
    max_rollbacks: int = 3  # on_nonfinite=rollback: rollbacks allowed in one run before stopping
    max_skips_in_a_row: int = 10  # on_nonfinite=skip: consecutive skipped steps allowed before stopping


@dataclass
class Problem:
    """What went wrong at one step."""

    step: int  # the optimizer step (1-based) at which it was seen
    kind: str  # "nonfinite", "uniform", "spike", "dead" or "weights"
    message: str  # one line: the step, the numbers, and why it is a problem
    last_good_step: int  # the newest step whose weights (and checkpoint) the problem does not implicate

    @property
    def skippable(self) -> bool:
        """True when not applying this one step's update undoes it (a bad batch, not a broken model)."""
        return self.kind in ("nonfinite", "spike")


@dataclass
class HealthMonitor:
    """Feed it each step's numbers; it keeps a short history (JSON-able, saved in checkpoints)."""

    vocab_size: int  # the model's output vocabulary: ln(vocab_size) is the loss of uniform guessing
    limits: HealthLimits = field(default_factory=HealthLimits)  # the thresholds
    recent: list[list[float]] = field(default_factory=list)  # [step, loss] of the last accepted steps
    lowest: float | None = None  # the lowest accepted loss so far
    zero_since: int | None = None  # the first step of the current run of zero gradient norms

    def check_step(self, step: int, loss: float, grad_norm: float) -> Problem | None:
        """Judge step ``step``'s loss and gradient norm (before the update); None records it as healthy."""
        uniform = math.log(self.vocab_size)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Problem(step, "nonfinite", f"step {step}: loss {loss}, gradient norm {grad_norm} is not finite",
                           step - 1)
        if self.lowest is not None and loss >= uniform and self.lowest < (1 - self.limits.uniform_margin) * uniform:
            return Problem(step, "uniform", f"step {step}: loss {loss:.4g} is at or above ln(vocab)={uniform:.4g}, "
                           f"no better than uniform guessing, after reaching {self.lowest:.4g} (diverged)", step - 2)
        losses = [x for _, x in self.recent]
        if len(losses) >= self.limits.spike_min_history:
            median = statistics.median(losses)
            if loss > self.limits.spike_factor * median and loss - median >= self.limits.spike_min_rise:
                return Problem(step, "spike", f"step {step}: loss {loss:.4g} is {loss / median:.1f}x the median "
                               f"{median:.4g} of the last {len(losses)} steps (a loss spike)", step - 2)
        self.zero_since = (self.zero_since or step) if grad_norm == 0.0 else None
        if self.zero_since is not None and step - self.zero_since + 1 >= self.limits.dead_steps:
            first = self.zero_since
            self.zero_since = None
            return Problem(step, "dead", f"step {step}: gradient norm exactly 0 since step {first} "
                           f"(loss {loss:.4g}); training is dead", first - 2)
        self.recent = (self.recent + [[step, loss]])[-self.limits.spike_window:]
        self.lowest = loss if self.lowest is None else min(self.lowest, loss)
        return None

    def check_weights(self, step: int, largest: float) -> Problem | None:
        """Judge the adapter weights after step ``step``'s update, given their largest magnitude."""
        if math.isfinite(largest) and largest <= self.limits.max_weight:
            return None
        return Problem(step, "weights", f"step {step}: an adapter weight reached {largest:.4g} after the update "
                       f"(limit {self.limits.max_weight:g}); the adapter has exploded", step - 1)

    def forget_after(self, step: int) -> None:
        """Drop the history of steps after ``step`` (after rolling back to the checkpoint of ``step``)."""
        self.recent = [r for r in self.recent if r[0] <= step]
        self.lowest = min((x for _, x in self.recent), default=self.lowest)
        self.zero_since = None

    def state(self) -> dict:
        """The history as JSON-able data (saved in the trainer state, so a resumed run keeps its baseline)."""
        return {"recent": self.recent, "lowest": self.lowest, "zero_since": self.zero_since}

    def load(self, saved: dict) -> None:
        """Restore what ``state()`` returned."""
        self.recent = [list(r) for r in saved.get("recent", [])]
        self.lowest, self.zero_since = saved.get("lowest"), saved.get("zero_since")


@torch.no_grad()
def largest_weight(params: list[torch.Tensor]) -> float:
    """The largest magnitude over ``params`` (NaN if any is NaN, inf if any is inf); one cheap pass."""
    peaks = [p.detach().abs().amax().float() for p in params if p.numel()]  # a rank's FSDP shard may be empty
    return float(torch.stack(peaks).max()) if peaks else 0.0
