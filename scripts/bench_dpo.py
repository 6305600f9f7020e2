"""Side-by-side DPO on the 4-bit base: qlora-kit vs TRL's DPOTrainer + PEFT + bitsandbytes.

The same model (SmolLM2-135M-Instruct, NF4 + double quant), the same pairs (the demo's preference task,
``qlora_kit/demo/preference.py``: the chosen answer writes the city in capitals), the same settings (sigmoid
DPO, beta 0.1, lr 1e-4 cosine with 2 warmup steps, batch 8 pairs, max_seq_len 256, LoRA r=16 alpha=32 on all
linear layers, seed 42), both from the base with the base as reference (TRL: the PEFT model with its adapter
disabled, no second model; the reference log-probs computed live at every step in both: no precomputed cache),
each in its own subprocess, one after the other:

  ours   qlora_kit.training.recipe.train, training.objective=dpo, with its defaults (compute dtype auto,
         checkpointing auto, paged_adamw_8bit: adamw_8bit on CPU)
  peer   TRL DPOTrainer, PEFT LoraConfig(all-linear), transformers' BitsAndBytesConfig(nf4, double quant),
         prepare_model_for_kbit_training, adamw_torch; compute dtype ``--peer-dtype`` (auto: bf16 on a CPU with
         native bf16, AVX512-BF16 or AMX, else fp32), no gradient checkpointing unless ``--peer-checkpointing``

Both train on exactly the same token ids: qlora-kit's tokenisation of the pairs, handed to TRL as its own
``prompt_ids``/``chosen_ids``/``rejected_ids`` columns. Reported per run: training time (sum of optimizer-step
times), tokens/s (non-padding tokens of the chosen and rejected sequences), peak RSS (VmHWM: includes the
page cache of the mmapped weight files) and peak RssAnon (sampled every 20 ms: the anonymous memory the process
holds; see docs/FACTS on why), the step-1 loss (ln 2 = 0.6931 for both when the reference is the base), the
final loss and reward margin; then the ratios ours/peer. Raw JSON: docs/results/bench-dpo-<cpu kind>.json.

    python scripts/bench_dpo.py                          # 80 pairs, 10 steps each, 1 thread
    python scripts/bench_dpo.py --pairs 16 --max-steps 2 --out /tmp/bench-dpo-smoke --json /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import bench_train  # noqa: E402  (scripts/: memory sampler, step timer, token counter, subprocess runner, CPU info)

ROOT = Path(__file__).resolve().parents[1]
SEED, BATCH, LR, WARMUP, MAX_LEN, R, ALPHA, BETA = 42, 8, 1e-4, 2, 256, 16, 32.0, 0.1


def worker_ours(args) -> dict:
    import torch

    from qlora_kit.demo.preference import preference_config
    from qlora_kit.model.load import load_model
    from qlora_kit.training.recipe import train

    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    training = {"objective": "dpo", "dpo_beta": BETA, "lr": LR, "batch_size": BATCH, "max_steps": args.max_steps,
                "scheduler": "cosine", "warmup_steps": WARMUP, "eval_every": 0, "save_every": 0, "seed": SEED}
    config = preference_config(args.model, data / "train.jsonl", None, out / "run", None, training)
    config.data.cache_dir = str(data / ".token-cache")
    if hasattr(config.training, "reference_logps"):  # a reference forward every step, as TRL's default does
        config.training.reference_logps = "live"
    model, tokenizer = load_model(args.model)  # defaults: NF4 + double quant, compute dtype auto
    result = train(config, progress=False, model=model, tokenizer=tokenizer)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    dtype = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[str(model.qlora_compute_dtype).removeprefix("torch.")]
    return {"dtype": dtype, "steps": result.steps,
            "tokens": result.tokens, "train_s": result.seconds, "losses": [r["loss"] for r in steps],
            "margins": [r["reward_margin"] for r in steps],
            "checkpointing": json.loads((out / "run" / "run_info.json").read_text())["gradient_checkpointing"],
            **bench_train.training_peaks()}


def pretokenized(data: Path, model_path: str):
    """qlora-kit's tokenisation of the pairs as TRL's columns (prompt_ids, chosen_ids, rejected_ids)."""
    from qlora_kit.config import DataConfig
    from qlora_kit.data import IGNORE_INDEX
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.training.validate import load_tokenizer

    tokenizer = load_tokenizer(Path(model_path), False)
    pairs, _, _ = prepare_data(DataConfig(train_file=str(data / "train.jsonl"), max_seq_len=MAX_LEN), tokenizer)
    rows = []
    for p in pairs:
        start = [next(i for i, x in enumerate(e.labels) if x != IGNORE_INDEX) for e in (p.chosen, p.rejected)]
        if start[0] != start[1] or p.chosen.input_ids[:start[0]] != p.rejected.input_ids[:start[1]]:
            raise ValueError("a pair's two sides do not share their prompt tokens")
        rows.append({"prompt_ids": p.chosen.input_ids[:start[0]], "chosen_ids": p.chosen.input_ids[start[0]:],
                     "rejected_ids": p.rejected.input_ids[start[1]:]})
    return rows, tokenizer


def worker_peer(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    class Pretokenized(DPOTrainer):  # the rows are already TRL's tokenized columns
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows, tokenizer = pretokenized(Path(args.data), args.model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    config = DPOConfig(output_dir=str(Path(args.out) / "run"), max_length=MAX_LEN, per_device_train_batch_size=BATCH,
                       max_steps=args.max_steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP,
                       weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=BETA, loss_type=["sigmoid"],
                       logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=SEED,
                       data_seed=SEED, bf16=args.dtype == "bf16", use_cpu=True,
                       gradient_checkpointing=args.checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False} if args.checkpointing else None,
                       dataloader_num_workers=0, disable_tqdm=True)
    timer = bench_train.step_timer()
    trainer = Pretokenized(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           callbacks=[timer])
    counts = bench_train.count_tokens(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"dtype": args.dtype, "checkpointing": args.checkpointing, "steps": trainer.state.global_step,
            "tokens": counts["tokens"], "train_s": timer.seconds, "losses": [h["loss"] for h in logs],
            "margins": [h.get("rewards/margins") for h in logs], **bench_train.training_peaks()}


def run_worker(args) -> None:
    start = time.perf_counter()
    with bench_train.MemorySampler() as mem:
        bench_train.SAMPLER = mem
        result = worker_ours(args) if args.worker == "ours" else worker_peer(args)
    result.update(wall_s=time.perf_counter() - start, peak_anon_mb=mem.peak_anon / 2**20,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.out, "result.json").write_text(json.dumps(result))


def launch(name: str, args, out: Path, data: Path, model: Path, dtype: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--out", str(out), "--data", str(data), "--model", str(model),
           "--max-steps", str(args.max_steps), "--threads", str(args.threads), "--dtype", dtype]
    if args.peer_checkpointing:
        cmd.append("--checkpointing")
    return bench_train.run_process(name, cmd, out, args.threads)


def report(results: dict[str, dict]) -> dict:
    """Print the table and the ours/peer ratios; returns the ratios."""
    print(f"\n{'run':<6}{'dtype':>9}{'ckpt':>5}{'steps':>6}{'wall s':>8}{'train s':>9}{'tok/s':>8}{'peak RSS MB':>12}"
          f"{'peak anon MB':>13}{'train anon MB':>14}{'loss@1':>8}{'loss end':>9}{'margin end':>11}")
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["train_s"]
        print(f"{name:<6}{r['dtype']:>9}{'on' if r['checkpointing'] else 'off':>5}{r['steps']:>6}{r['wall_s']:>8.0f}"
              f"{r['train_s']:>9.0f}{r['tokens_per_s']:>8.1f}{r['peak_rss_mb']:>12.0f}{r['peak_anon_mb']:>13.0f}"
              f"{r['train_peak_anon_mb']:>14.0f}{r['losses'][0]:>8.4f}{r['losses'][-1]:>9.4f}"
              f"{math.nan if r['margins'][-1] is None else r['margins'][-1]:>11.4f}")
    if not {"ours", "peer"} <= set(results):
        return {}
    o, q = results["ours"], results["peer"]
    ratios = {"tokens_per_s": o["tokens_per_s"] / q["tokens_per_s"], "peak_rss": o["peak_rss_mb"] / q["peak_rss_mb"],
              "peak_anon": o["peak_anon_mb"] / q["peak_anon_mb"],
              "train_peak_anon": o["train_peak_anon_mb"] / q["train_peak_anon_mb"], "wall": o["wall_s"] / q["wall_s"]}
    print(f"ours/peer: tokens/s {ratios['tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x, peak RssAnon "
          f"{ratios['peak_anon']:.2f}x (training phase {ratios['train_peak_anon']:.2f}x), wall {ratios['wall']:.2f}x; "
          f"step-1 loss {o['losses'][0]:.4f} vs {q['losses'][0]:.4f} (ln 2 = {math.log(2):.4f})")
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=80, help="training pairs (the demo's preference task)")
    p.add_argument("--max-steps", type=int, default=10, help="optimizer steps per run (batch 8 pairs)")
    p.add_argument("--runs", default="ours,peer")
    p.add_argument("--peer-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--peer-checkpointing", action="store_true", help="the peer with gradient checkpointing")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="runs/bench-dpo")
    p.add_argument("--json", default="", help="raw results (default docs/results/bench-dpo-<kind>.json)")
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    for hidden in ("--data", "--model", "--dtype"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return 0

    from qlora_kit.demo.model import demo_model_path
    from qlora_kit.demo.preference import write_preference_dataset

    out, model = Path(args.out), demo_model_path()
    write_preference_dataset(out / "data", n_train=args.pairs, n_eval=0)
    info = bench_train.cpu_info()
    info["load_before"] = bench_train.load_average()
    dtype = args.peer_dtype if args.peer_dtype != "auto" else ("fp32" if info["kind"] == "avx2" else "bf16")
    print(f"machine: {info['model']}, flags {' '.join(info['flags'])} ({info['kind']}); load average "
          f"{info['load_before']}; {args.pairs} pairs, {args.max_steps} steps, batch {BATCH}, {args.threads} thread(s)",
          flush=True)
    results = {name: launch(name, args, out / name, out / "data", model, dtype)
               for name in (r.strip() for r in args.runs.split(",")) if name}
    ratios = report(results)
    info["load_after"] = bench_train.load_average()
    target = Path(args.json or ROOT / "docs" / "results" / f"bench-dpo-{info['kind']}.json")
    target.write_text(json.dumps({"cpu": info, "threads": args.threads, "pairs": args.pairs,
                                  "settings": {"beta": BETA, "lr": LR, "batch": BATCH, "max_len": MAX_LEN, "r": R,
                                               "alpha": ALPHA, "seed": SEED, "peer_dtype": dtype,
                                               "peer_checkpointing": args.peer_checkpointing},
                                  "results": results, "ratios": ratios}, indent=1))
    print(f"raw results: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
