"""Run records: ``metrics.jsonl`` (one JSON line per logged step or evaluation) and ``loss.png``."""
from __future__ import annotations

import json
import resource
from pathlib import Path

from qlora_kit.atomic import atomic_write_bytes


def _parse_line(line: str) -> dict | None:
    """One metrics record, or None for a blank line or one torn by a kill in the middle of its write."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Append-only JSON-lines log that survives resume: lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
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

    def plot(self, out: Path) -> Path | None:
        """Train and validation loss against step, titled by the run folder, written atomically to ``out`` (PNG)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
        ax.set_title(f"{'train and validation' if val else 'train'} loss, run {out.parent.name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats per supervised token)")
        ax.grid(alpha=0.3)
        ax.legend()
        plot_exact_match(ax, self.records)
        return save_figure(fig, out)


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

