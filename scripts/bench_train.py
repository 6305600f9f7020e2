"""Side-by-side QLoRA fine-tune: qlora-kit vs transformers + PEFT + bitsandbytes (+ TRL's SFTTrainer).

Runs the same fine-tune (SmolLM2-135M-Instruct, the demo task, LoRA r=16 alpha=32 on all linear layers,
batch 8, lr 2e-4 cosine with 5 warmup steps, max_seq_len 256, seed 42, response-only loss) in separate
subprocesses, one after another:

  ours          qlora_kit.training.recipe.train with its defaults (compute dtype auto, checkpointing auto, adamw_8bit)
  peer-default  TRL SFTTrainer + PEFT + bnb NF4 + double quant, the standard QLoRA recipe: bf16 compute
                (bf16=True), prepare_model_for_kbit_training with gradient checkpointing, adamw_torch;
                timed over --peer-default-steps steps (2, no validation) unless 0 is given: on a CPU without native bf16
                it runs ~5 tokens/s, and a full epoch would take hours
  peer-best     the same stack, no checkpointing, compute dtype fp32 or bf16: on a CPU with native bf16 a
                short probe of both picks the faster, otherwise fp32 (or --peer-best-dtype fixes it)

Every run trains on exactly the same token ids and labels (qlora-kit's tokenisation of the demo records;
the peer gets them as a pre-tokenised dataset with a ``completion_mask``), and afterwards computes the
validation loss the same way: mean cross-entropy per supervised token over the eval examples, from the
model's full logits (``model(input_ids, attention_mask).logits``), batches of 8 sorted by length.

Reported per run: wall time of the subprocess, training time (sum of optimizer-step times: forward,
backward, optimizer; no evaluation or checkpointing), trained tokens/s (non-padding tokens and supervised
tokens), peak RSS (VmHWM: includes page cache of the mmapped weight files) and peak RssAnon (sampled every
20 ms: anonymous memory the process holds), final train loss (mean of the last 10 steps), validation loss,
useful GFLOP/s and its fraction of this machine's GEMM peak in the run's compute dtype (measured here).

Useful FLOPs per step = 4·N·T + 4·V·h·S + 6·N_lora·T, where N = linear weights of the decoder blocks
(frozen, 4-bit), T = non-padding tokens, V·h = LM head, S = supervised tokens, N_lora = LoRA parameters:
forward 2·N·T plus input-gradient backward 2·N·T for the frozen base; the head only needs supervised
positions (forward + input-grad); LoRA forward, input-grad and weight-grad. Attention scores
(4·s·h per token per layer, forward) are left out: under 2% at these lengths.

    python scripts/bench_train.py                         # the default run (160 examples, 1 epoch = 20 steps)
    python scripts/bench_train.py --examples 160 --max-steps 12   # a few minutes
    python scripts/bench_train.py --size 1b --runs ours,peer-best --max-steps 4   # the ~1B Llama-shaped random model

The raw results go to ``docs/results/bench-train-<cpu kind>[-1b].json`` (``--json`` to change), with the CPU's
model name, its SIMD/matrix flags and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED, BATCH, LR, WARMUP, MAX_LEN, R, ALPHA = 42, 8, 2e-4, 5, 256, 16, 32.0
SAMPLER = None  # the worker's MemorySampler


# ------------------------------------------------------------------------------------------------
# measurement helpers (run inside each worker)

def training_peaks() -> dict:
    """Peaks so far (called when training ends, before the shared validation pass)."""
    return {"train_peak_anon_mb": SAMPLER.peak_anon / 2**20,
            "train_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class MemorySampler:
    """Samples RssAnon and VmRSS from /proc/self/status every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon, self.peak_rss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        anon = rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return anon, rss

    def _run(self):
        while not self._stop.is_set():
            anon, rss = self.read()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gemm_peak(dtype_name: str, threads: int, n: int = 2048, reps: int = 7) -> float:
    """Best GFLOP/s of an n×n matmul in ``dtype_name`` over ``reps`` timed repetitions on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flop_counts(model_path: Path, lora_params: int) -> dict:
    """N (decoder-block linear weights), V·h (LM head) and LoRA parameter count, from config.json."""
    cfg = json.loads((model_path / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    return {"N": per_layer * layers, "head": cfg["vocab_size"] * h, "lora": lora_params}


def useful_flops(counts: dict, tokens: int, supervised: int) -> float:
    return 4 * counts["N"] * tokens + 4 * counts["head"] * supervised + 6 * counts["lora"] * tokens


def prepare_examples(data_dir: Path, model_path: Path):
    """qlora-kit's tokenisation of the demo records: (train examples, eval examples, tokenizer)."""
    from qlora_kit.config import DataConfig
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.training.validate import load_tokenizer

    tokenizer = load_tokenizer(model_path, False)
    cfg = DataConfig(train_file=str(data_dir / "train.jsonl"), eval_file=str(data_dir / "eval.jsonl"),
                     max_seq_len=MAX_LEN)
    train, evals, _ = prepare_data(cfg, tokenizer, cache_dir=data_dir / ".token-cache", seed=SEED)
    return train, evals, tokenizer


def validation_loss(model, examples, pad_id: int, autocast_bf16: bool = False) -> float:
    """Mean CE per supervised token from full logits, batches of 8 sorted by length (same for every run)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from qlora_kit.data.batching import collate

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for s in range(0, len(order), BATCH):
            b = collate([examples[i] for i in order[s:s + BATCH]], pad_id, False, MAX_LEN)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [b, s, V]
            targets = b["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / max(count, 1)


def step_timer():
    """A transformers TrainerCallback summing the wall time of optimizer steps into ``.seconds``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = 0.0, None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds += time.perf_counter() - self.t0

    return StepTimer()


def count_tokens(trainer) -> dict:
    """Wrap a transformers Trainer's collator to count non-padding ``tokens`` and ``supervised`` tokens (labels,
    or TRL's ``completion_mask``) of every batch it trains on; returns the live counts."""
    counts, collator = {"tokens": 0, "supervised": 0}, trainer.data_collator

    def counting(features):
        batch = collator(features)
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["supervised"] += int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else \
            int(batch["completion_mask"].sum())
        return batch

    trainer.data_collator = counting
    return counts


def run_process(name: str, cmd: list[str], out: Path, threads: int) -> dict:
    """Run a worker command with ``threads`` OpenMP threads, its output in ``out/log.txt``; its result.json."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
    t = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(f"{name} failed ({proc.returncode}):\n" + "\n".join(tail))
    result = json.loads((out / "result.json").read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {time.perf_counter() - t:.0f} s, "
          f"{result['tokens'] / result['train_s']:.0f} tokens/s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# workers

def worker_ours(args) -> dict:
    import torch

    from qlora_kit.demo.run import demo_config
    from qlora_kit.model.lora import lora_layers
    from qlora_kit.training.recipe import train

    torch.set_num_threads(args.threads)
    model_path, data_dir, out = Path(args.model), Path(args.data), Path(args.out)
    config = demo_config(model_path, data_dir / "train.jsonl", data_dir / "eval.jsonl", out / "run")
    config.data.cache_dir = str(data_dir / ".token-cache")
    config.training.eval_every = 0  # only the final evaluation (train() always evaluates at the end)
    config.training.save_every = 0
    config.training.max_steps = args.max_steps
    config.training.seed = SEED
    config.training.compile = "on" if args.compile else "off"
    from qlora_kit.model.load import load_model

    model, tokenizer = load_model(model_path)  # defaults: NF4 + double quant, compute dtype auto (as the demo does)
    result = train(config, progress=False, model=model, tokenizer=tokenizer)
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    losses = [s["loss"] for s in steps]
    peaks = training_peaks()
    _, evals, _ = prepare_examples(data_dir, model_path)
    lora_params = sum(p.numel() for _, layer in lora_layers(model) for p in layer.adapters.parameters())
    return {"dtype": str(model.qlora_compute_dtype).removeprefix("torch."),
            "checkpointing": json.loads((out / "run" / "run_info.json").read_text())["gradient_checkpointing"],
            "steps": result.steps, "tokens": result.tokens, "supervised": result.supervised_tokens,
            "train_s": result.seconds, "losses": losses, "lora_params": lora_params,
            # the first two steps (with training.compile on, the compilations: padded and unpadded batches)
            "warmup_s": sum(s["step_s"] for s in steps[:2]),
            "warmup_tokens": steps[min(1, len(steps) - 1)]["tokens_per_s"] * sum(s["step_s"] for s in steps[:2]),
            "val_loss": validation_loss(model, evals, tokenizer.pad_token_id),
            "own_eval_loss": result.eval_loss, **peaks}


def worker_peer(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model_path, data_dir, out = Path(args.model), Path(args.data), Path(args.out)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    train, evals, tokenizer = prepare_examples(data_dir, model_path)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]}
                            for e in train])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    timer = step_timer()
    sft = SFTConfig(output_dir=str(out / "run"), max_length=MAX_LEN, per_device_train_batch_size=BATCH,
                    num_train_epochs=1, max_steps=args.max_steps or -1, learning_rate=LR, lr_scheduler_type="cosine",
                    warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                    logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=SEED, data_seed=SEED,
                    bf16=args.dtype == "bf16", use_cpu=True, gradient_checkpointing=args.checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False} if args.checkpointing else None,
                    completion_only_loss=True, packing=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tokenizer, callbacks=[timer])
    counts = count_tokens(trainer)
    trainer.train()
    peaks = training_peaks()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"dtype": args.dtype, "checkpointing": args.checkpointing, "steps": trainer.state.global_step,
            "tokens": counts["tokens"], "supervised": counts["supervised"], "train_s": timer.seconds,
            "losses": losses, "lora_params": lora_params,
            "val_loss": float("nan") if args.no_eval else
            validation_loss(model, evals, tokenizer.pad_token_id, autocast_bf16=args.dtype == "bf16"),
            **peaks}


def run_worker(args) -> None:
    global SAMPLER
    start = time.perf_counter()
    with MemorySampler() as mem:
        SAMPLER = mem
        result = worker_ours(args) if args.worker == "ours" else worker_peer(args)
    result.update(wall_s=time.perf_counter() - start, peak_anon_mb=mem.peak_anon / 2**20,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.out, "result.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# driver

def launch(name: str, kind: str, args, out: Path, data: Path, model: Path, **extra) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", kind, "--out", str(out), "--data", str(data), "--model", str(model),
           "--max-steps", str(extra.get("max_steps", args.max_steps)), "--threads", str(args.threads)]
    if kind == "peer":
        cmd += ["--dtype", extra["dtype"]] + (["--checkpointing"] if extra["checkpointing"] else [])
    if extra.get("no_eval"):
        cmd.append("--no-eval")
    if extra.get("compile"):
        cmd.append("--compile")
    return run_process(name, cmd, out, args.threads)


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
# a random Llama-shaped ~1B model (TinyLlama's shape: 1.03B parameters with the tiny 384-token vocabulary)
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048}


def cpu_info() -> dict:
    """The CPU's model name, the SIMD/matrix flags that decide the compute dtype, and a short kind name."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    present = [f for f in SIMD_FLAGS if f in flags]
    kind = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else "avx2"
    return {"model": name, "flags": present, "kind": kind}


def model_for(size: str, out: Path) -> Path:
    """The demo model, or (``1b``) a random bf16 Llama of the 1B shape written once under ``out``."""
    from qlora_kit.demo.model import demo_model_path

    if size == "demo":
        return demo_model_path()
    import torch

    from qlora_kit.testing.tiny import make_tiny_model

    folder = out / "model-1b"
    if not (folder / "config.json").is_file():
        make_tiny_model(folder, dtype=torch.bfloat16, **LLAMA_1B)
    return folder


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=160,
                   help="training examples (demo task; default 160 = 20 steps: the whole run took 19 minutes on "
                        "a 2-core AVX2 CPU; the demo itself trains 600)")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps per run (0: one epoch)")
    p.add_argument("--runs", default="ours,peer-default,peer-best",
                   help="comma list of ours, ours-compiled (training.compile on; steady state after its two compiling steps), "
                        "peer-default, peer-best")
    p.add_argument("--peer-default-steps", type=int, default=2,
                   help="optimizer steps of the peer-default run (0: as many as the others). Its bf16 recipe runs "
                        "~5 tokens/s on a CPU without native bf16, so by default it is timed, not trained to the end; "
                        "the quality gate then compares with peer-best")
    p.add_argument("--peer-best-dtype", default="auto", choices=["auto", "probe", "fp32", "bf16"],
                   help="peer-best compute dtype; 'probe' times --probe-steps steps of each and keeps the faster; "
                        "'auto' probes only on a CPU with native bf16 (AMX or AVX512-BF16) and takes fp32 otherwise")
    p.add_argument("--probe-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads per run (and for the GEMM peak); on a machine shared with other jobs, "
                        "1 thread avoids OpenMP barrier stalls (see docs/benchmarks.md)")
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--json", default="", help="write the raw results here (default docs/results/bench-train-<kind>.json)")
    p.add_argument("--size", default="demo", choices=["demo", "1b"],
                   help="demo: SmolLM2-135M (the default run); 1b: a random Llama of the ~1B shape (use --max-steps)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return 0

    from qlora_kit.demo.task import write_demo_dataset

    out = Path(args.out)
    model = model_for(args.size, out)
    data = out / "data"
    write_demo_dataset(data, n_train=args.examples, n_eval=args.eval_examples)
    info = cpu_info()
    info["load_before"] = load_average()
    native_bf16 = info["kind"] != "avx2"
    # without native bf16, torch's bf16 GEMM is a slow fallback (a 2048² matmul took 52 s on a 2-core AVX2 CPU):
    # measure its peak on a smaller matrix, fewer times, so the benchmark stays inside its time budget
    gemm = {"fp32": {}, "bf16": {} if native_bf16 else {"n": 512, "reps": 3}}
    peaks = {d: gemm_peak(d, args.threads, **gemm[d]) for d in ("fp32", "bf16")}
    print(f"machine: {info['model']}, {os.cpu_count()} CPUs, flags {' '.join(info['flags'])} ({info['kind']}); "
          f"GEMM peak (2048², bf16 512² without native bf16; {args.threads} thread(s)): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"load average {load_average()}", flush=True)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    results: dict[str, dict] = {}
    best_dtype, probe = args.peer_best_dtype, {}
    if best_dtype == "auto":
        best_dtype = "probe" if native_bf16 else "fp32"
        if not native_bf16:
            print("peer-best: fp32 (this CPU has no native bf16; a bf16 probe would only cost time)", flush=True)
    if "peer-best" in runs and best_dtype == "probe":
        for d in ("fp32", "bf16"):
            r = launch(f"probe peer {d}", "peer", args, out / f"probe-{d}", data, model, dtype=d, checkpointing=False,
                       max_steps=args.probe_steps)
            probe[d] = r["tokens"] / r["train_s"]
        best_dtype = max(probe, key=probe.get)
        print(f"peer-best probe ({args.probe_steps} steps, no checkpointing): " +
              ", ".join(f"{d} {v:.0f} tokens/s" for d, v in probe.items()) + f" -> {best_dtype}", flush=True)
    for name in runs:
        if name in ("ours", "ours-compiled"):
            results[name] = launch(name, "ours", args, out / name, data, model, compile=name == "ours-compiled")
        elif name == "peer-default":
            results[name] = launch(name, "peer", args, out / name, data, model, dtype="bf16", checkpointing=True,
                                   max_steps=args.peer_default_steps or args.max_steps,
                                   no_eval=bool(args.peer_default_steps))  # timed only: its bf16 eval takes minutes
        elif name == "peer-best":
            results[name] = launch(name, "peer", args, out / name, data, model, dtype=best_dtype, checkpointing=False)
    peaks_after = {d: gemm_peak(d, args.threads, **gemm[d]) for d in ("fp32", "bf16")}
    peaks = {d: max(peaks[d], peaks_after[d]) for d in peaks}

    counts = flop_counts(model, next(iter(results.values()))["lora_params"])
    rows = []
    for name, r in results.items():
        if name == "ours-compiled":  # steady state: the first two steps compile (their time is printed below)
            r["train_s"] -= r["warmup_s"]
            r["tokens"] -= round(r["warmup_tokens"])
            r["supervised"] = round(r["supervised"] * r["tokens"] / (r["tokens"] + r["warmup_tokens"]))
        tps, sps = r["tokens"] / r["train_s"], r["supervised"] / r["train_s"]
        gflops = useful_flops(counts, r["tokens"], r["supervised"]) / r["train_s"] / 1e9
        tail = r["losses"][-10:]
        r.update(tokens_per_s=tps, supervised_per_s=sps, useful_gflops=gflops,
                 peak_fraction=gflops / peaks[{"bfloat16": "bf16", "float32": "fp32"}.get(r["dtype"], r["dtype"])],
                 final_train_loss=sum(tail) / max(len(tail), 1))
        rows.append((name, r))
    head = (f"{'run':<13}{'dtype':>6}{'ckpt':>5}{'steps':>6}{'wall s':>8}{'train s':>9}{'tok/s':>8}{'sup tok/s':>10}"
            f"{'peak RSS MB':>12}{'peak anon MB':>13}{'train anon MB':>14}{'train loss':>11}{'val loss':>9}{'GFLOP/s':>9}{'% peak':>8}")
    print("\n" + head)
    for name, r in rows:
        print(f"{name:<13}{r['dtype']:>6}{'on' if r['checkpointing'] else 'off':>5}{r['steps']:>6}{r['wall_s']:>8.0f}"
              f"{r['train_s']:>9.0f}{r['tokens_per_s']:>8.1f}{r['supervised_per_s']:>10.1f}{r['peak_rss_mb']:>12.0f}"
              f"{r['peak_anon_mb']:>13.0f}{r['train_peak_anon_mb']:>14.0f}{r['final_train_loss']:>11.4f}{r['val_loss']:>9.4f}{r['useful_gflops']:>9.0f}"
              f"{100 * r['peak_fraction']:>7.1f}%")
    print(f"\nuseful FLOPs = 4·N·T + 4·V·h·S + 6·N_lora·T with N = {counts['N']:,}, V·h = {counts['head']:,}, "
          f"N_lora = {counts['lora']:,}; GEMM peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"load average at the end {load_average()}")
    if probe:
        print("peer-best dtype probe: " + ", ".join(f"{d} {v:.0f} tokens/s" for d, v in probe.items()) + f" -> {best_dtype}")
    if "ours-compiled" in results:
        print(f"ours-compiled: steps 3 on (steady state); its first two steps, with the compilations, took "
              f"{results['ours-compiled']['warmup_s']:.0f} s")
    ratios = {}
    for ours in ("ours", "ours-compiled"):
        if ours not in results:
            continue
        o = results[ours]
        for peer in ("peer-default", "peer-best"):
            if peer in results:
                q = results[peer]
                ratios[f"{ours}/{peer}"] = {"tokens_per_s": o["tokens_per_s"] / q["tokens_per_s"],
                                "peak_rss": o["peak_rss_mb"] / q["peak_rss_mb"],
                                "peak_anon": o["peak_anon_mb"] / q["peak_anon_mb"],
                                "train_peak_anon": o["train_peak_anon_mb"] / q["train_peak_anon_mb"],
                                "val_loss": o["val_loss"] / q["val_loss"],
                                "wall": o["wall_s"] / q["wall_s"]}
                x = ratios[f"{ours}/{peer}"]
                same_steps = q["steps"] == o["steps"]
                quality = (f"val loss {x['val_loss']:.3f}x ({'within 2% or better' if x['val_loss'] <= 1.02 else 'WORSE than 2%'})"
                           if same_steps else f"val loss not compared ({q['steps']} vs {o['steps']} steps: timed only)")
                print(f"{ours}/{peer}: tokens/s {x['tokens_per_s']:.2f}x, peak RSS {x['peak_rss']:.2f}x, "
                      f"peak RssAnon {x['peak_anon']:.2f}x (training phase {x['train_peak_anon']:.2f}x), {quality}, "
                      f"wall {x['wall']:.2f}x")
    info["load_after"] = load_average()
    target = Path(args.json or ROOT / "docs" / "results" / f"bench-train-{info['kind']}{'-1b' if args.size == '1b' else ''}.json")
    target.write_text(json.dumps({"cpu": info, "size": args.size, "threads": args.threads, "peaks": peaks,
                                  "counts": counts, "results": results, "ratios": ratios, "probe": probe,
                                  "best_dtype": best_dtype}, indent=1))
    print(f"raw results: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
