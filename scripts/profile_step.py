"""Where a training step's time goes: qlora-kit's real step (4-bit base, LoRA, loss, optimizer) under torch.profiler.

    python scripts/profile_step.py                       # the demo model, batch 8 x 112 tokens, 27 supervised per row
    python scripts/profile_step.py --threads 1 --steps 3 --seq 256 --table 30

Prints the CPU's flags, seconds and tokens/s per step, useful GFLOP/s (forward + input-gradient backward of the
frozen base, the head on supervised positions, LoRA's three products) against the measured GEMM peak of the
compute dtype, and the share of self CPU time by kind of op (GEMM, attention, optimizer, dequantization, ...).
Random token ids: the timing does not depend on the text.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_train import (  # the side-by-side's own helpers
    cpu_info,
    flop_counts,
    gemm_peak,
    model_for,
    useful_flops,
)

# op-name fragments -> the kind reported; the first match wins
KINDS = [
    ("loss", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("attention", ("attention", "sdpa", "aten::bmm", "aten::baddbmm", "aten::_softmax")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("optimizer", "adam", "_fused_")),
    ("dequantize", ("dequantize", "bitsandbytes")),
    ("elementwise", ("aten::mul", "aten::add", "aten::copy_", "aten::to", "aten::_to_copy", "aten::silu", "aten::rsqrt",
                     "aten::pow", "aten::mean", "aten::neg", "aten::cat", "aten::sub", "aten::div", "aten::sum",
                     "aten::clone", "aten::contiguous", "aten::fill_", "aten::zero_", "aten::empty")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="demo", choices=["demo", "1b"], help="the demo model or the random ~1B Llama")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=112, help="tokens per row")
    p.add_argument("--supervised", type=int, default=27, help="supervised (response) tokens per row")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compute-dtype", default="auto")
    p.add_argument("--optimizer", default="paged_adamw_8bit")
    p.add_argument("--table", type=int, default=25, help="rows of the per-op table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["QLORA_KIT_THREADS"] = str(args.threads)

    from qlora_kit import LoraConfig, add_lora, load_model
    from qlora_kit.config import TrainingConfig
    from qlora_kit.data import IGNORE_INDEX
    from qlora_kit.dtypes import dtype_name
    from qlora_kit.training.loss import causal_lm_loss
    from qlora_kit.training.optim import build_optimizer

    path = model_for(args.size, Path("runs/bench-train"))
    model, _ = load_model(path, compute_dtype=args.compute_dtype)
    add_lora(model, LoraConfig(r=16, alpha=32))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = build_optimizer(params, TrainingConfig(optimizer=args.optimizer), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq - args.supervised] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    def step():
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    times.sort()
    sec = times[len(times) // 2]
    tokens = args.batch * args.seq
    dtype = dtype_name(model.qlora_compute_dtype)
    counts = flop_counts(Path(path), sum(q.numel() for q in params))
    flops = useful_flops(counts, tokens, args.batch * args.supervised)
    peak = gemm_peak(dtype, args.threads)
    info = cpu_info()
    print(f"CPU: {info['model']}, flags {' '.join(info['flags'])} ({info['kind']}); threads {args.threads}; "
          f"compute {dtype}; optimizer {type(opt).__name__}")
    print(f"step (median of {args.steps}, profiled): {sec:.3f} s = {tokens / sec:.1f} tokens/s; useful "
          f"{flops / sec / 1e9:.1f} GFLOP/s = {100 * flops / sec / 1e9 / peak:.0f}% of the {dtype} GEMM peak "
          f"({peak:.0f} GFLOP/s, 2048² best of 7)")
    shares: dict[str, float] = defaultdict(float)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for e in events:
        shares[kind_of(e.key)] += e.self_cpu_time_total
    print("self CPU by kind: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in
                                            sorted(shares.items(), key=lambda kv: -kv[1])))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.table))


if __name__ == "__main__":
    main()
