"""Choose the rank of a dynamic-rank adapter after training: evaluate it at several ranks, recommend one.

A dynamic-rank (QDyLoRA) adapter trained at r_max can run at any rank k <= r_max: the first k rows of A and
columns of B, scaled alpha/k. ``rank_sweep`` measures validation loss (and, for alpaca records with an
``output``, held-out exact match by greedy generation) at each requested rank, and recommends the
smallest rank whose loss is within ``tolerance`` (relative) of the best loss, and whose exact match, when
measured, is within ``tolerance`` (absolute, as a fraction) of the best. ``qlora-kit rank-sweep`` prints
the table and writes ``rank_sweep.json`` and ``rank_sweep.png``; ``--export`` then writes the adapter at the
recommended rank as an ordinary PEFT LoRA.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_kit.config import ConfigError

log = logging.getLogger("qlora_kit")

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class SweepRow:
    """One rank's measurements."""

    rank: int
    loss: float  # mean cross-entropy per supervised token
    exact_match: float | None = None  # fraction of records answered exactly, when measured
    seconds: float = 0.0  # evaluation time at this rank


@dataclass
class SweepResult:
    """A rank sweep: the rows, the rule that chose the rank, and the choice."""

    adapter: str
    r_max: int
    dynamic: bool  # trained with dynamic rank (if not, truncations were never trained and mean little)
    tolerance: float
    rows: list[SweepRow] = field(default_factory=list)
    recommended: int | None = None
    best_loss_rank: int | None = None

    def table(self) -> str:
        """The rows as a text table, the recommended rank marked with ``*``."""
        em = any(r.exact_match is not None for r in self.rows)
        best = min(r.loss for r in self.rows)
        lines = [f"{'rank':>6}{'val loss':>11}{'vs best':>9}" + (f"{'exact match':>13}" if em else "")]
        for r in self.rows:
            mark = " *" if r.rank == self.recommended else ""
            line = f"{r.rank:>6}{r.loss:>11.4f}{100 * (r.loss / best - 1):>+8.1f}%"
            if em:
                line += f"{'' if r.exact_match is None else f'{r.exact_match:.1%}':>13}"
            lines.append(line + mark)
        return "\n".join(lines)


def recommend(rows: list[SweepRow], tolerance: float) -> int:
    """The smallest rank with loss <= best * (1 + tolerance) and, when measured, exact match >= best - tolerance."""
    if not rows:
        raise ValueError("no ranks were evaluated")
    best_loss = min(r.loss for r in rows)
    ems = [r.exact_match for r in rows if r.exact_match is not None]
    best_em = max(ems) if ems else None
    for r in sorted(rows, key=lambda r: r.rank):
        if r.loss <= best_loss * (1 + tolerance) and (best_em is None or r.exact_match is None
                                                     or r.exact_match >= best_em - tolerance - 1e-12):
            return r.rank
    return max(r.rank for r in rows)  # unreachable: the best row always qualifies


def sweep(model, tokenizer, examples, ranks: list[int], records: list[dict] | None = None, name: str = "default",
          batch_size: int = 16, max_seq_len: int = 512, tolerance: float = 0.02, progress: bool = True) -> SweepResult:
    """Evaluate adapter ``name`` (already loaded on ``model``) at each rank; restores its rank afterwards.

    ``examples``: tokenized validation examples (``data.Example``); ``records``: alpaca records with an
    ``output`` for exact match, or None to skip it. Returns a SweepResult with the recommendation.
    """
    from qlora_kit.inference.evaluate import evaluate
    from qlora_kit.model.lora import lora_layers, set_rank
    from qlora_kit.training.evaluate import evaluate_loss

    adapters = [layer.adapters[name] for _, layer in lora_layers(model) if name in layer.adapters]
    if not adapters:
        raise ConfigError(f"no adapter named {name!r} is loaded on the model")
    r_max, before = max(a.r for a in adapters), adapters[0].rank
    config = getattr(model, "lora_configs", {}).get(name)
    result = SweepResult(adapter=name, r_max=r_max, dynamic=bool(config and config.dynamic_rank), tolerance=tolerance)
    try:
        for k in ranks:
            t0 = time.perf_counter()
            set_rank(model, k, name)
            loss = evaluate_loss(model, examples, batch_size, tokenizer.pad_token_id, max_seq_len)
            em = evaluate(model, tokenizer, records, max_new_tokens=32, loss=False).score if records else None
            row = SweepRow(k, loss, em, round(time.perf_counter() - t0, 1))
            result.rows.append(row)
            if progress:
                print(f"rank {k:>4}: validation loss {loss:.4f}" + (f", exact match {em:.1%}" if em is not None else "")
                      + f" ({row.seconds:.0f} s)", flush=True)
    finally:
        set_rank(model, before, name)
    result.recommended = recommend(result.rows, tolerance)
    result.best_loss_rank = min(result.rows, key=lambda r: r.loss).rank
    return result


def plot(result: SweepResult, out: Path) -> Path:
    """Validation loss (and exact match) against rank, log-2 x axis, the recommended rank marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_kit.training.metrics import save_figure

    ranks = [r.rank for r in result.rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.plot(ranks, [r.loss for r in result.rows], "o-", color="tab:blue", label="validation loss")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("validation loss (per supervised token)", color="tab:blue")
    ax.grid(alpha=0.3)
    if result.recommended is not None:
        ax.axvline(result.recommended, color="gray", ls="--", lw=1, label=f"recommended: {result.recommended}")
    if any(r.exact_match is not None for r in result.rows):
        ax2 = ax.twinx()
        pts = [(r.rank, r.exact_match) for r in result.rows if r.exact_match is not None]
        ax2.plot(*zip(*pts), "s-", color="tab:orange", label="exact match")
        ax2.set_ylabel("held-out exact match", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.legend(loc="upper right")
    ax.set_title(f"rank sweep (tolerance {result.tolerance:g})")
    return save_figure(fig, out)


def _base_model_path(adapter_dir: Path, model: str | None) -> str:
    if model:
        return model
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and Path(base).is_dir():
        return base
    raise ConfigError(f"{adapter_dir}: no --model given and the adapter's base_model_name_or_path ({base!r}) is not "
                      "a local folder; pass --model PATH (or --model demo)")


def parse_ranks(text: str | None, r_max: int) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; None -> powers of two up to r_max, plus r_max. Ranks above r_max are errors."""
    if not text:
        return sorted({k for k in DEFAULT_RANKS if k <= r_max} | {r_max})
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--ranks {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    bad = [k for k in ranks if not 1 <= k <= r_max]
    if bad or not ranks:
        raise ConfigError(f"--ranks {text!r}: every rank must be in [1, {r_max}] (the adapter's rank)")
    return ranks


def _output_folder(args: argparse.Namespace, adapter_dir: Path, base: str) -> Path:
    """The folder for the sweep's report, after refusing a --out or --export that would change an input."""
    from qlora_kit.atomic import check_replaceable
    from qlora_kit.model.adapters import CONFIG_FILE
    from qlora_kit.paths import check_output_path

    out = Path(args.out) if args.out else adapter_dir.parent / "rank_sweep"
    inputs = {"--adapter": adapter_dir, "--data": args.data, "--model": base}
    check_output_path(out, inputs)
    if args.export:
        check_output_path(args.export, inputs, "--export")
        check_replaceable(args.export, True, (CONFIG_FILE,), "adapter")  # what save_adapter will allow, checked now
    return out


def refuse_preference_data(data: str, fmt: str) -> None:
    """Raise ConfigError (one line, before any model loads) when ``data`` holds preference pairs: the sweep scores
    single responses (validation loss, exact match); it has no preference metric yet."""
    from qlora_kit.data.formats import detect_format
    from qlora_kit.data.sources import read_records

    if fmt == "auto":
        first = next(iter(read_records(Path(data))), None)
        fmt = detect_format(first[1], first[0]) if first is not None else fmt
    if fmt == "preference":
        raise ConfigError(f"{data}: preference records (prompt/chosen/rejected), but rank-sweep scores single "
                          "responses (validation loss, exact match) and has no preference metric; sweep on "
                          "held-out SFT records (e.g. prompt/completion with the chosen answers)")


def run_rank_sweep(args: argparse.Namespace) -> int:
    """``qlora-kit rank-sweep``: load the base and the adapter, sweep, print, write JSON and plot, maybe export."""
    from qlora_kit.atomic import atomic_write_json
    from qlora_kit.config import DataConfig
    from qlora_kit.data.contract import apply_contract
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.data.sources import load_records
    from qlora_kit.model.adapters import load_adapter, read_adapter, save_adapter
    from qlora_kit.model.load import load_model

    adapter_dir = Path(args.adapter)
    info = read_adapter(adapter_dir)  # errors for a missing or malformed adapter before any weight is loaded
    base = _base_model_path(adapter_dir, args.model)
    out = _output_folder(args, adapter_dir, base)
    ranks = parse_ranks(args.ranks, info.config.r)
    refuse_preference_data(args.data, args.format)
    if not info.config.dynamic_rank:
        log.warning("%s was not trained with dynamic rank: its truncations were never trained, so expect loss to "
                    "rise steeply below r=%d (adapter-resize shrinks a fixed-rank adapter by SVD instead)",
                    adapter_dir, info.config.r)
    records = None
    if args.task_metric:
        if args.task_metric != "exact_match":
            raise ConfigError(f"--task-metric {args.task_metric!r}: only exact_match is supported")
        records = load_records(args.data)
        if not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records):
            raise ConfigError(f"{args.data}: --task-metric exact_match needs alpaca records with instruction and output")
        records = records[: args.task_examples] if args.task_examples else records
    model, tokenizer = load_model(base, compute_dtype=args.compute_dtype)  # "demo" was resolved by the CLI
    load_adapter(model, adapter_dir)
    apply_contract(tokenizer, adapter_dir)  # render the data with the template the adapter was trained with
    data_cfg = DataConfig(train_file=str(args.data), format=args.format, max_seq_len=args.max_seq_len)
    examples, _, _ = prepare_data(data_cfg, tokenizer)
    result = sweep(model, tokenizer, examples, ranks, records, batch_size=args.batch_size,
                   max_seq_len=args.max_seq_len, tolerance=args.tolerance)
    result.adapter = str(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**asdict(result), "data": str(args.data), "examples": len(examples),
              "task_examples": len(records) if records else 0,
              "rule": "smallest rank with loss <= best*(1+tolerance) and exact match >= best-tolerance"}
    atomic_write_json(out / "rank_sweep.json", report)
    plot(result, out / "rank_sweep.png")
    print("\n" + result.table())
    print(f"\nrecommended rank: {result.recommended} (smallest within {args.tolerance:g} of the best; best loss at "
          f"rank {result.best_loss_rank})\nwrote {out / 'rank_sweep.json'} and {out / 'rank_sweep.png'}")
    if args.export:
        save_adapter(model, args.export, rank=result.recommended)
        print(f"exported the rank-{result.recommended} adapter (ordinary PEFT LoRA) to {args.export}")
    else:
        print(f"export it: qlora-kit merge --adapter {adapter_dir} --rank {result.recommended} ..., or rerun with "
              "--export DIR for a rank-k PEFT adapter")
    return 0


def add_parser(sub) -> None:
    """Register ``rank-sweep`` on the CLI's subparsers."""
    sw = sub.add_parser("rank-sweep", help="evaluate a dynamic-rank adapter at several ranks and recommend one")
    sw.add_argument("--adapter", required=True, help="adapter folder (trained with lora.dynamic_rank=true)")
    sw.add_argument("--data", required=True, help="validation records (JSONL/JSON/CSV/Parquet, any training format)")
    sw.add_argument("--model", help="base model folder or 'demo' (default: the adapter's base_model_name_or_path)")
    sw.add_argument("--ranks", help="comma-separated ranks (default: powers of two up to r, and r)")
    sw.add_argument("--tolerance", type=float, default=0.02,
                    help="relative loss tolerance (and absolute exact-match tolerance) for the recommendation")
    sw.add_argument("--task-metric", choices=["exact_match"], help="also measure held-out exact match by generation "
                    "(alpaca records with an output)")
    sw.add_argument("--task-examples", type=int, default=0, help="exact match on the first N records only (0: all)")
    sw.add_argument("--format", default="auto", help="data format: auto, alpaca, chat, prompt_completion or text "
                    "(preference pairs are refused: no preference metric)")
    sw.add_argument("--max-seq-len", type=int, default=512)
    sw.add_argument("--batch-size", type=int, default=16)
    sw.add_argument("--compute-dtype", default="auto")
    sw.add_argument("--out", help="folder for rank_sweep.json and rank_sweep.png (default: beside the adapter)")
    sw.add_argument("--export", help="also write the adapter at the recommended rank (PEFT format) to this folder")
    sw.set_defaults(func=run_rank_sweep)
