"""Run records: ``metrics.jsonl`` (one JSON line per logged step or evaluation) and ``loss.png`` (loss, and for
dpo/orpo the pair metrics: rewards of chosen and rejected responses, margin, preference accuracy)."""
from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path

from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.config import TrainingConfig

LOSS_LABELS = {  # the loss panel's y label per objective (dpo: per dpo_loss)
    "sft": "cross-entropy (nats per supervised token)",
    "sigmoid": "DPO loss, -log σ(reward margin) (nats per pair)",
    "ipo": "IPO loss, (token-mean log-ratio gap - 1/(2β))² (per pair)",
    "hinge": "hinge loss, relu(1 - reward margin) (per pair)",
    "orpo": "ORPO loss: NLL per chosen token - λ·log σ(log odds ratio) (nats)",
}
REWARD_LABELS = {  # the pair panel's y label per objective
    "dpo": "reward β·log(π/π_ref) of the response (nats)",
    "orpo": "reward λ·mean log π per response token (nats)",
}


def _parse_line(line: str) -> dict | None:
    """One metrics record, or None for a blank line or one torn by a kill in the middle of its write."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Append-only JSON-lines log that survives resume: lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True,
                 on_write: Callable[[dict], None] | None = None):
        self.path, self.enabled, self.on_write = path, enabled, on_write  # on_write: also send each record (trackers)
        self.records: list[dict] = []
        if enabled and path.is_file():
            kept = [r for line in path.read_text().splitlines() if (r := _parse_line(line)) is not None]
            self.records = [r for r in kept if r.get("step", 0) <= resume_step] if resume_step else []
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def write(self, record: dict) -> None:
        """Append one record (a dict with at least ``step``)."""
        self.records.append(record)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.on_write is not None:
                self.on_write(record)

    def plot(self, out: Path, tc: TrainingConfig | None = None) -> Path | None:
        """Train and validation loss against step, titled by the run folder, written atomically to ``out`` (PNG).

        For a preference objective (``tc.objective`` dpo/orpo) a second panel shows the rewards of the chosen
        and rejected responses, their margin and the preference accuracy, train (lines) and validation (dots).
        """
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tc = tc or TrainingConfig()
        pairs = tc.objective != "sft" and any("reward_margin" in r or "eval_reward_margin" in r for r in self.records)
        fig, axes = plt.subplots(2 if pairs else 1, 1, figsize=(7, 7.5 if pairs else 4), dpi=110, sharex=True,
                                 squeeze=False)
        self._plot_loss(axes[0][0], out.parent.name, tc)
        if pairs:
            self._plot_pairs(axes[1][0], out.parent.name, tc)
        axes[-1][0].set_xlabel("optimizer step")
        return save_figure(fig, out)

    def _series(self, key: str, scale: float = 1.0) -> list[tuple[int, float]]:
        return [(r["step"], scale * r[key]) for r in self.records if key in r]

    def _plot_loss(self, ax, run_name: str, tc: TrainingConfig) -> None:
        train, val = self._series("loss"), self._series("eval_loss")
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
        ax.set_title(f"{'train and validation' if val else 'train'} loss, run {run_name}")
        ax.set_ylabel(LOSS_LABELS[tc.dpo_loss if tc.objective == "dpo" else tc.objective])
        ax.grid(alpha=0.3)
        ax.legend()
        plot_exact_match(ax, self.records)

    def _plot_pairs(self, ax, run_name: str, tc: TrainingConfig) -> None:
        """Rewards and margin on the left axis (train lines, validation dots), preference accuracy on the right."""
        for key, label, color in (("reward_chosen", "chosen", "tab:green"), ("reward_rejected", "rejected", "tab:red"),
                                  ("reward_margin", "margin", "tab:blue")):
            if train := self._series(key):
                ax.plot(*zip(*train), color=color, lw=1.2, label=f"{label} (train)")
            if val := self._series(f"eval_{key}"):
                ax.plot(*zip(*val), "o--", color=color, lw=1, label=f"{label} (validation)")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_ylabel(REWARD_LABELS[tc.objective])
        ax.set_title(f"rewards and preference accuracy, run {run_name}")
        ax.grid(alpha=0.3)
        acc = ax.twinx()
        if train := self._series("pref_accuracy", 100):
            acc.plot(*zip(*train), color="black", lw=0.8, alpha=0.5, label="accuracy (train)")
        if val := self._series("eval_pref_accuracy", 100):
            acc.plot(*zip(*val), "s:", color="black", label="accuracy (validation)")
        acc.set_ylim(-5, 105)
        acc.set_ylabel("preference accuracy (% of pairs, chosen reward > rejected)")
        handles = [h for a in (ax, acc) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left", ncol=2)


def plot_exact_match(ax, records: list[dict]) -> None:
    """Held-out exact match (``eval_exact_match``, training.eval_generate_every) on its own right-hand axis of
    ``ax``, 0 to 100%, with its own legend; nothing when the run did not measure it."""
    points = [(r["step"], 100 * r["eval_exact_match"]) for r in records if "eval_exact_match" in r]
    if not points:
        return
    right = ax.twinx()
    right.plot(*zip(*points), "s--", color="tab:green", label="held-out exact match", lw=1.2)
    right.set_ylim(-2, 102)
    right.set_ylabel("held-out exact match (%)")
    right.legend(loc="center right")


def save_figure(fig, out: Path) -> Path:
    """Write a matplotlib figure as PNG atomically, close it, and return the path."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (includes page cache of memory-mapped weight files)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

