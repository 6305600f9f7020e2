"""What a run does about a health problem (``training.on_nonfinite``): stop, skip the step, or roll back.

- ``stop``: end the run with status "diverged" and one line naming the step, why, and the last good checkpoint.
- ``skip``: do not apply this step's update. Only a non-finite or spiking loss can be skipped (a bad batch);
  a dead gradient, a loss at uniform-guessing level or exploded weights stop the run. More than
  ``HealthLimits.max_skips_in_a_row`` skips in a row stop it too.
- ``rollback``: restore the adapter and optimizer of the newest *good* checkpoint from before the problem
  began and go on with the next step, so the batches in between are skipped (replaying them would diverge
  again: data order and seeds are fixed per step). At most ``HealthLimits.max_rollbacks`` per run.

A good checkpoint passes ``verify_checkpoint`` and holds weights the problem does not implicate
(``Problem.last_good_step``), outside any window an earlier rollback abandoned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.training.checkpoint import list_checkpoints, load_trainer_state, verify_checkpoint
from qlora_kit.training.health import HealthLimits, Problem

_ADVICE = "Lower training.lr, check the data, or set training.on_nonfinite=skip or rollback"


def good_checkpoint_before(root: Path, step: int, abandoned: list[list[int]] = ()) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` at or before ``step`` that verifies and is not in an abandoned window.

    ``abandoned`` holds ``[after, upto]`` step windows whose checkpoints a rollback gave up (exclusive ends).
    Returns the folder (or None) and one note per newer checkpoint passed over, saying why.
    """
    notes = []
    for folder in reversed(list_checkpoints(root)):
        at = int(load_trainer_state(folder).get("step", -1)) if (folder / "trainer_state.json").is_file() else -1
        if at > step:
            notes.append(f"{folder.name} was written after the problem began")
        elif any(a < at < b for a, b in abandoned):
            notes.append(f"{folder.name} was abandoned by an earlier rollback")
        elif problems := verify_checkpoint(folder):
            notes.append(f"{folder.name} failed verification ({'; '.join(problems)})")
        else:
            return folder, notes
    return None, notes


@dataclass
class Recovery:
    """The on_nonfinite policy and its counters (JSON-able through ``state()``, saved in checkpoints)."""

    policy: str  # "stop", "skip" or "rollback" (training.on_nonfinite)
    root: Path  # the run's checkpoints folder
    limits: HealthLimits = field(default_factory=HealthLimits)  # max_rollbacks, max_skips_in_a_row
    rollbacks: int = 0  # rollbacks done so far in this run
    skips_in_a_row: int = 0  # consecutive skipped steps
    abandoned: list[list[int]] = field(default_factory=list)  # [checkpoint step, problem step] windows rolled back over

    def decide(self, problem: Problem) -> tuple[str, Path | None, str]:
        """``("stop" | "skip" | "rollback", checkpoint to restore or None, one-line message)``."""
        good, notes = good_checkpoint_before(self.root, problem.last_good_step, self.abandoned)
        if self.policy == "skip" and problem.skippable and self.skips_in_a_row < self.limits.max_skips_in_a_row:
            self.skips_in_a_row += 1
            return "skip", None, f"{problem.message}; step skipped (training.on_nonfinite=skip)"
        if self.policy == "rollback" and good is not None and self.rollbacks < self.limits.max_rollbacks:
            self.rollbacks += 1
            self.skips_in_a_row = 0
            self.abandoned.append([int(load_trainer_state(good)["step"]), problem.step])
            return "rollback", good, (f"{problem.message}; rolled back to {good} (rollback {self.rollbacks} of at "
                                      f"most {self.limits.max_rollbacks}); steps up to {problem.step} are skipped")
        why = {"skip": " (skipping cannot undo this)" if not problem.skippable else
               f" ({self.skips_in_a_row} steps skipped in a row)",
               "rollback": " (no good checkpoint to roll back to)" if good is None else
               f" ({self.rollbacks} rollbacks already)"}.get(self.policy, "")
        passed = f" ({'; '.join(notes)})" if notes else ""
        return "stop", None, (f"{problem.message}; stopped{why}. The last good checkpoint is "
                              f"{good or 'none'}{passed}. {_ADVICE}")

    def accepted(self) -> None:
        """A healthy step was applied: the run of skips is over."""
        self.skips_in_a_row = 0

    def state(self) -> dict:
        """The counters as JSON-able data."""
        return {"rollbacks": self.rollbacks, "abandoned": self.abandoned}

    def load(self, saved: dict) -> None:
        """Restore what ``state()`` returned."""
        self.rollbacks, self.abandoned = int(saved.get("rollbacks", 0)), [list(w) for w in saved.get("abandoned", [])]
