"""Benchmark: one dynamic-rank QLoRA run (r_max=32, r_min=1) against fixed-rank runs, on the demo task.

Every run uses the demo's settings (demo_run.demo_config: SmolLM2-135M-Instruct in 4-bit NF4, all linear
layers, 600 training examples, 1 epoch, batch 8, AdamW lr 2e-4 cosine with 5 warmup steps) and the same
data and seed. Only the LoRA shape differs:

* fixed rank r: ``alpha = 2r``, so the scale alpha/r is 2 at every rank; with ``--fixed-alpha matched``,
  ``alpha = 2 * r_max`` (the dynamic adapter's alpha, so both apply the scale 64/r at rank r);
* dynamic: ``r = 32, r_min = 1, alpha = 64`` and the QDyLoRA scale alpha/b for the active rank b
  (2 at b = 32, 64 at b = 1): exactly what the exported rank-b PEFT adapter (r = b, lora_alpha = 64) applies.

Each run is written to OUT/<name>/ and skipped when its result exists, so the script can be re-run after an
interruption; results go to OUT/results.json. Validation loss (100 held-out records) is measured at every
rank of the dynamic adapter and at the fixed runs' own ranks; held-out exact match (greedy generation) on
the first ``--em-examples`` held-out records at the ranks in ``--em-ranks``.

    python scripts/bench_dynamic_rank.py --out runs/bench-dynrank [--ranks 2,4,8,16,32] [--em-ranks 2,8,32]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.atomic import atomic_write_json  # noqa: E402
from qlora_kit.data.prepare import prepare_data  # noqa: E402
from qlora_kit.data.sources import load_records  # noqa: E402
from qlora_kit.demo.model import demo_model_path  # noqa: E402
from qlora_kit.demo.run import demo_config  # noqa: E402
from qlora_kit.demo.task import write_demo_dataset  # noqa: E402
from qlora_kit.inference.evaluate import evaluate  # noqa: E402
from qlora_kit.model.load import load_model  # noqa: E402
from qlora_kit.model.lora import set_rank  # noqa: E402
from qlora_kit.training.evaluate import evaluate_loss  # noqa: E402
from qlora_kit.training.recipe import train  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _proxy_dataset(folder: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Alpaca records "Spell <w> in capitals." -> "<W>" over 40 random 4-6 letter words (a memorisation task).

    Held-out records reuse the words and phrasings (a random base model cannot generalise to new ones), so
    validation measures how well each rank stores the 40 mappings."""
    import random

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))
                    for _ in range(40)})
    phrasings = ["Spell {} in capitals.", "Write {} in upper case.", "{} in capital letters:"]
    train = [{"instruction": rng.choice(phrasings).format(w), "output": w.upper()}
             for w in (rng.choice(words) for _ in range(n_train))]
    held = [{"instruction": phrasings[i % 3].format(w), "output": w.upper()} for i, w in enumerate((words * 3)[:n_eval])]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench-dynrank")
    ap.add_argument("--ranks", default="2,4,8,16,32", help="fixed-rank runs, in the order they are trained")
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--r-min", type=int, default=1)
    ap.add_argument("--sweep-ranks", default="1,2,4,8,16,32", help="ranks at which the dynamic adapter is evaluated")
    ap.add_argument("--em-ranks", default="2,8,32", help="ranks with held-out exact match (generation is slow)")
    ap.add_argument("--em-examples", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--order", default="dynamic,fixed", help="which comes first")
    ap.add_argument("--proxy", action="store_true",
                    help="the tests' tiny random Llama (hidden 64, 2 layers) on a short uppercase-the-string task "
                         "instead of SmolLM2 on the demo task (torch AdamW, fp32): a mechanism check in minutes on a "
                         "loaded CPU, not the demo result")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--fixed-alpha", default="2r", choices=["2r", "matched"],
                    help="fixed runs' alpha: 2r (scale 2 at every rank) or matched (alpha = 2 * r_max, the dynamic "
                         "adapter's alpha, so a fixed rank-b run applies the same scale as the dynamic adapter at b)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    out = Path(args.out)
    if args.proxy:
        train_file, eval_file = _proxy_dataset(out / "data", args.n_train, 100)
    else:
        train_file, eval_file = write_demo_dataset(out / "data", n_train=args.n_train)
    em_records = load_records(eval_file)[: args.em_examples]
    em_ranks = set(_ints(args.em_ranks))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.proxy:
        from qlora_kit.testing.tiny import make_tiny_model

        path = out / "proxy-model"
        if not (path / "config.json").is_file():
            make_tiny_model(path, initializer_range=0.3)  # as tests/test_train.py's learnable model
    else:
        path = demo_model_path()

    suffix = f"-a{2 * args.r_max}" if args.fixed_alpha == "matched" else ""
    runs = [("dynamic", args.r_max, True)] + [(f"fixed-r{r}{suffix}", r, False) for r in _ints(args.ranks)]
    if args.order.startswith("fixed"):
        runs = runs[1:] + runs[:1]
    for name, r, dynamic in runs:
        if name in results:
            print(f"{name}: done already", flush=True)
            continue
        config = demo_config(path, train_file, eval_file, out / name)
        config.lora.r, config.lora.r_min, config.lora.dynamic_rank = r, args.r_min, dynamic
        config.lora.alpha = 2.0 * (args.r_max if dynamic or args.fixed_alpha == "matched" else r)
        config.training.eval_every, config.training.save_every = 0, 0  # time the training, evaluate once at the end
        config.training.lr = args.lr
        if args.proxy:
            config.data.max_seq_len, config.model.compute_dtype, config.training.optimizer = 64, "fp32", "adamw"
        model, tokenizer = load_model(path, compute_dtype=config.model.compute_dtype)
        t0 = time.perf_counter()
        result = train(config, model=model, tokenizer=tokenizer, progress=False)
        wall = time.perf_counter() - t0
        _, eval_set, _ = prepare_data(config.data, tokenizer)
        row = {"r": r, "alpha": config.lora.alpha, "dynamic": dynamic, "steps": result.steps,
               "train_seconds": round(result.seconds, 1), "train_wall_seconds": round(wall, 1),
               "loss": {}, "exact_match": {}, "em_seconds": {}}
        for k in (_ints(args.sweep_ranks) if dynamic else [r]):
            set_rank(model, k)
            row["loss"][k] = round(evaluate_loss(model, eval_set, 16, tokenizer.pad_token_id,
                                                 config.data.max_seq_len), 5)
            print(f"{name} rank {k}: validation loss {row['loss'][k]:.4f}", flush=True)
        for k in (sorted(em_ranks) if dynamic else [r] if r in em_ranks else []):
            set_rank(model, k)
            e0 = time.perf_counter()
            row["exact_match"][k] = evaluate(model, tokenizer, em_records, max_new_tokens=32, loss=False).score
            row["em_seconds"][k] = round(time.perf_counter() - e0, 1)
            print(f"{name} rank {k}: exact match {row['exact_match'][k]:.0%} ({row['em_seconds'][k]:.0f} s)",
                  flush=True)
        set_rank(model, None)
        results[name] = row
        atomic_write_json(results_file, results)
        print(f"{name}: trained {result.steps} steps in {result.seconds:.0f} s", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
