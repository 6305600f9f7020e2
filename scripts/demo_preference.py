"""The demo's preference stage: DPO after the demo's SFT adapter, on pairs whose chosen answer writes the city
in capitals (``qlora_kit/demo/preference.py``), measured on held-out pairs before and after.

    python scripts/demo_preference.py --sft-adapter runs/demo-X/run/adapter     # DPO from the SFT adapter
    python scripts/demo_preference.py --from-base                               # DPO from the base model

Before: the SFT adapter (or the base). After: the DPO adapter, with the SFT adapter (or the base) as reference.
Measured on the held-out pairs: preference accuracy (policy log-prob of chosen > rejected), the implicit-reward
accuracy against the reference (after), and greedy generations: the fraction that follow the rule (city in
capitals), and exact match to the chosen and to the rejected (SFT-style) answer. Printed side by side and
written to ``<out>/preference_report.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

ROWS = [  # (report key, label, format)
    ("pref_accuracy", "preference accuracy (log π chosen > rejected)", "{:.0%}"),
    ("logp_margin", "mean log π(chosen) - log π(rejected) (nats)", "{:+.2f}"),
    ("reward_accuracy", "implicit-reward accuracy vs the reference", "{:.0%}"),
    ("reward_margin", "mean reward margin / beta (nats)", "{:+.2f}"),
    ("follows_rule", "greedy answers with the city in capitals", "{:.0%}"),
    ("exact_match_chosen", "exact match to the chosen answer", "{:.0%}"),
    ("exact_match_rejected", "exact match to the rejected (SFT) answer", "{:.0%}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--sft-adapter", help="the demo's SFT adapter folder (qlora-kit demo writes <out>/run/adapter)")
    start.add_argument("--from-base", action="store_true", help="start DPO from the base model instead")
    p.add_argument("--model", default="demo", help="base model folder (default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="", help="output folder (default runs/pref-demo-<timestamp>)")
    p.add_argument("--train", type=int, default=160, help="training pairs")
    p.add_argument("--eval", type=int, default=100, help="held-out pairs")
    p.add_argument("--objective", default="dpo", choices=["dpo", "orpo"])
    p.add_argument("--beta", type=float, default=0.1, help="training.dpo_beta")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: --epochs over the pairs)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--compute-dtype", default="auto")
    return p.parse_args(argv)


def _load(model_path, args, adapters: dict[str, Path]):
    """The 4-bit base with these adapters loaded by name (the last one active)."""
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.load import load_model

    model, tokenizer = load_model(model_path, compute_dtype=args.compute_dtype)
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    return model, tokenizer


def _print_report(before: dict, after: dict, start: str, pairs: list[dict], n: int = 4) -> None:
    print(f"\nheld-out pairs: {before['pairs']}     before = {start}, after = DPO adapter")
    print(f"{'':<50}{'before':>10}{'after':>10}")
    for key, label, fmt in ROWS:
        cells = [fmt.format(r[key]) if key in r else "n/a" for r in (before, after)]
        print(f"{label:<50}{cells[0]:>10}{cells[1]:>10}")
    for p, b, a in list(zip(pairs, before["examples"], after["examples"]))[:n]:
        print(f"\n  chosen:   {p['chosen']}\n  before:   {b['prediction']}\n  after:    {a['prediction']}")


def run(args: argparse.Namespace) -> dict:
    """Write the pairs, measure the start, train, measure the result; returns the report (also written)."""
    from bench_train import cpu_info  # scripts/: the CPU's name and SIMD flags

    from qlora_kit.atomic import atomic_write_json
    from qlora_kit.demo.model import resolve_model_path
    from qlora_kit.demo.preference import measure, preference_config, write_preference_dataset
    from qlora_kit.training.recipe import train

    out = Path(args.out or f"runs/pref-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    model_path = resolve_model_path(args.model)
    training = {"objective": args.objective, "dpo_beta": args.beta, "lr": args.lr, "batch_size": args.batch,
                "epochs": args.epochs, "max_steps": args.max_steps, "scheduler": "cosine", "warmup_steps": 2,
                "optimizer": "adamw", "eval_every": 0, "save_every": 0}
    train_file, eval_file = write_preference_dataset(out / "data", args.train, args.eval)
    config = preference_config(model_path, train_file, eval_file, out / "run", args.sft_adapter, training,
                               args.compute_dtype)  # fails before any work when model.adapter is missing
    from qlora_kit.data.sources import load_records

    pairs = load_records(eval_file)
    start = {"sft": Path(args.sft_adapter)} if args.sft_adapter else {}
    model, tokenizer = _load(model_path, args, start)
    print(f"measuring {'the SFT adapter' if start else 'the base model'} on {len(pairs)} held-out pairs...")
    before = measure(model, tokenizer, pairs, max_new_tokens=args.max_new_tokens)
    del model
    print(f"\n{args.objective.upper()}: {args.train} pairs, beta {args.beta:g}, lr {args.lr:g}, batch {args.batch}, "
          f"LoRA r={config.lora.r} from {'the SFT adapter' if start else 'the base'}")
    result = train(config)
    model, tokenizer = _load(model_path, args, {**start, "dpo": result.adapter_dir})
    after = measure(model, tokenizer, pairs, reference=list(start), max_new_tokens=args.max_new_tokens)
    _print_report(before, after, "SFT adapter" if start else "base model", pairs)
    report = {"start": str(args.sft_adapter or "base"), "model": str(model_path), "settings": vars(args),
              "compute_dtype": str(model.qlora_compute_dtype).removeprefix("torch."), "before": before,
              "after": after, "steps": result.steps, "train_seconds": round(result.seconds, 1),
              "train_tokens_per_s": round(result.tokens_per_s, 1), "eval_pairs": result.eval_pairs,
              "adapter": str(result.adapter_dir), "cpu": cpu_info()}
    atomic_write_json(out / "preference_report.json", report)
    print(f"\nreport: {out / 'preference_report.json'}   adapter: {result.adapter_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    from qlora_kit.config import ConfigError

    args = parse_args(argv)
    try:
        report = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report["after"]["pref_accuracy"] > report["before"]["pref_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
