"""Measure the real memory peak of a QLoRA training step on CPU, in a fresh subprocess.

What is measured: **anonymous resident memory** (``RssAnon`` in ``/proc/self/status``), sampled by a thread
every millisecond, minus the baseline taken after torch, transformers and bitsandbytes are imported.
Anonymous memory is what tensors occupy; the pages of memory-mapped safetensors files (``RssFile``) are
reclaimable page cache and are not counted. The child runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB
so that glibc returns every freed tensor buffer to the kernel at once: RssAnon then follows live tensor
bytes instead of the allocator's high-water mark.

On CPU the runtime also keeps memory that is not tensors and grows with the first steps: oneDNN's JIT
kernels and primitive cache for each new matmul shape (about 10-20 MB here). After the steps the child
knows every live tensor exactly (model, LoRA parameters, gradients, optimizer states), so
``peak_tensors = persistent tensors + (peak RssAnon - RssAnon after the steps)`` is the tensor peak the
planner predicts (its framework-overhead row covers the runtime). The same difference also cancels 16-bit
weights that transformers leaves as views of the mmapped checkpoint (file pages, not RssAnon).

Run ``python -m qlora_kit.testing.measure --model DIR ...`` to print one measurement as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_kit.dtypes import NAMES
from qlora_kit.optimizers import OPTIMIZER_NAMES

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


@dataclass
class PhaseStats:
    """Memory and time of one phase of a measured run."""

    name: str  # "load", "lora", "train", "save", "merge"...
    seconds: float  # wall time of the phase
    peak_anon: int  # bytes: peak RssAnon during the phase minus the post-import baseline
    peak_rss: int  # bytes: peak total RSS (anonymous + file pages) during the phase, baseline not subtracted
    end_anon: int  # bytes: RssAnon at the end of the phase minus the baseline


@dataclass
class Measurement:
    """One measured training run (see the module docstring for what "anonymous" means)."""

    model: str  # checkpoint folder
    seq_len: int  # tokens per sequence
    batch: int  # sequences per step
    rank: int  # LoRA rank
    grad_checkpointing: bool  # activation checkpointing per decoder layer
    optimizer: str  # a name of qlora_kit.optimizers.OPTIMIZERS (paged ones fall back to unpaged on the CPU)
    compute_dtype: str  # "bf16", "fp16" or "fp32"
    loss: str  # "hf" (model(..., labels).loss) or "chunked" (qlora_kit.training.loss.causal_lm_loss)
    steps: int  # optimizer steps run
    baseline_anon: int  # bytes: RssAnon after imports, subtracted from every figure
    model_bytes: int  # bytes of the loaded 4-bit model (qlora_kit.model.load.model_bytes)
    peak_anon: int  # bytes: peak RssAnon over the training steps minus the baseline
    persistent_tensors: int  # bytes: tensors alive after the steps (model, LoRA params, grads, optimizer states)
    runtime_growth: int  # bytes: RssAnon after the steps minus persistent_tensors (oneDNN kernel caches etc.;
    # negative when transformers left 16-bit weights as views of the mmapped checkpoint)
    peak_tensors: int  # bytes: persistent_tensors + (peak RssAnon - RssAnon after the steps): the figure to compare
    phases: list[PhaseStats] = field(default_factory=list)  # per-phase stats

    def to_json(self) -> str:
        """This measurement as JSON."""
        return json.dumps(asdict(self))


def read_status() -> tuple[int, int]:
    """``(RssAnon, VmRSS)`` of this process in bytes, from /proc/self/status (Linux only)."""
    anon = rss = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return anon, rss


class PeakSampler:
    """A daemon thread that records the peak RssAnon and VmRSS of this process between ``reset`` calls."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_anon, self.peak_rss = read_status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = read_status()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        """Start a new peak from the current values."""
        self.peak_anon, self.peak_rss = read_status()

    def sample(self) -> None:
        """Take one sample now (call at phase ends so short peaks right before them are seen)."""
        anon, rss = read_status()
        self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class PhaseRecorder:
    """Times named phases and records their peaks relative to a baseline."""

    def __init__(self, baseline_anon: int):
        self.baseline = baseline_anon
        self.sampler = PeakSampler()
        self.phases: list[PhaseStats] = []

    def run(self, name: str, fn, *args, **kwargs):
        """Call ``fn(*args, **kwargs)`` as phase ``name`` and return its result."""
        self.sampler.reset()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.sampler.sample()
        anon, _ = read_status()
        self.phases.append(PhaseStats(name, time.perf_counter() - start, self.sampler.peak_anon - self.baseline,
                                      self.sampler.peak_rss, anon - self.baseline))
        return result

    def phase(self, name: str) -> PhaseStats:
        return next(p for p in self.phases if p.name == name)


def _loss_fn(kind: str):
    if kind == "chunked":
        from qlora_kit.training.loss import causal_lm_loss

        def chunked(model, ids):
            total, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            return total / max(n, 1)

        return chunked
    return lambda model, ids: model(input_ids=ids, labels=ids).loss


def train_steps(model, optimizer, ids, steps: int, loss: str) -> list[float]:
    """Run ``steps`` forward/backward/optimizer steps on the batch ``ids``; return the losses."""
    compute = _loss_fn(loss)
    losses = []
    for _ in range(steps):
        value = compute(model, ids)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(value.detach()))
        del value
    return losses


def _warm_up_runtime(model: str) -> None:
    """Import the modeling code and run one tiny matmul + backward, so the baseline holds the whole runtime.

    transformers imports a model's code lazily (about 25 MB of RssAnon with bitsandbytes' integration) and
    the first matmul and backward initialise oneDNN and autograd; none of that is tensor memory.
    """
    import importlib

    import bitsandbytes.nn  # noqa: F401
    import bitsandbytes.optim  # noqa: F401
    import torch
    import torch.utils.checkpoint  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: F401

    from qlora_kit.model import load as model_module  # noqa: F401
    try:
        from qlora_kit.training import loss  # noqa: F401
    except ImportError:
        pass
    model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type", "llama")
    for name in (f"transformers.models.{model_type}.modeling_{model_type}", "transformers.integrations.bitsandbytes"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(8, 64, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(x, torch.randn(32, 64, dtype=dtype)).sum().backward()


def _child(args: argparse.Namespace) -> Measurement:
    """The measured run itself (inside the subprocess)."""
    import bitsandbytes  # noqa: F401
    import torch
    import transformers  # noqa: F401  (imported before the baseline on purpose)

    from qlora_kit.config import LoraConfig, TrainingConfig
    from qlora_kit.model.load import load_model, model_bytes
    from qlora_kit.model.lora import add_lora
    from qlora_kit.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _warm_up_runtime(args.model)
    baseline, _ = read_status()
    rec = PhaseRecorder(baseline)
    model, _tok = rec.run("load", load_model, args.model, compute_dtype=args.compute_dtype,
                          gradient_checkpointing=args.grad_checkpointing, device="cpu")
    weights = model_bytes(model)
    rec.run("lora", add_lora, model, LoraConfig(r=args.rank, alpha=2 * args.rank))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, TrainingConfig(optimizer=args.optimizer, lr=1e-4), torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    rec.run("train", train_steps, model, optimizer, ids, args.steps, args.loss)
    rec.sampler.stop()
    train = rec.phase("train")
    persistent = weights + _tensor_bytes(params) + _tensor_bytes(p.grad for p in params if p.grad is not None) + \
        _tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    growth = train.end_anon - persistent  # negative when weights stay in mmapped file pages
    return Measurement(args.model, args.seq_len, args.batch, args.rank, args.grad_checkpointing, args.optimizer,
                       args.compute_dtype, args.loss, args.steps, baseline, weights, train.peak_anon, persistent,
                       growth, train.peak_anon - growth, rec.phases)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlora_kit.testing.measure", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grad-checkpointing", type=lambda s: s.lower() in ("on", "true", "1"), default=True)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_NAMES)
    p.add_argument("--compute-dtype", default="bf16", choices=NAMES)
    p.add_argument("--loss", default="hf", choices=["hf", "chunked"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    return p


def measure_training_peak(model: str | Path, seq_len: int = 256, batch: int = 1, rank: int = 16,
                          grad_checkpointing: bool = True, optimizer: str = "adamw", compute_dtype: str = "bf16",
                          loss: str = "hf", steps: int = 2, threads: int = 2, timeout: float = 1800) -> Measurement:
    """Measure the peak anonymous memory of ``steps`` QLoRA training steps in a fresh subprocess.

    The step is load_model (NF4 + double quant) -> add_lora (all-linear, alpha = 2r) -> forward with labels,
    backward, optimizer step, on random token ids. Returns a Measurement whose ``peak_anon`` is the peak
    RssAnon during the steps minus the post-import baseline, and ``peak_tensors`` that peak less the runtime's
    own growth (see the module docstring). Raises RuntimeError with the child's stderr tail
    if the run fails or times out.
    """
    cmd = [sys.executable, "-m", "qlora_kit.testing.measure", "--model", str(model), "--seq-len", str(seq_len),
           "--batch", str(batch), "--rank", str(rank), "--grad-checkpointing", "on" if grad_checkpointing else "off",
           "--optimizer", optimizer, "--compute-dtype", compute_dtype, "--loss", loss, "--steps", str(steps),
           "--threads", str(threads)]
    env = {**os.environ, **_MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"measurement of {model} timed out after {timeout:.0f} s (lower seq_len or batch)") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"measurement of {model} failed (exit {proc.returncode}):\n{tail}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["phases"] = [PhaseStats(**p) for p in data["phases"]]
    return Measurement(**data)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: run one measurement and print it as the last line of stdout."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args(argv)
    print(_child(args).to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
