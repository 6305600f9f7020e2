"""``bench_scale.py --offload disk``: train a model whose 4-bit weights exceed RAM, memory-mapped from disk.

See bench_scale.py's docstring for the phases. Results go to OUT/offload-results.json (rewritten after every
phase, so an interrupted run keeps what it measured) and are printed as Markdown at the end.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

GB = 1e9


def io_counters() -> dict:
    """Bytes this process read from storage (/proc/self/io read_bytes) and its major page faults."""
    read = 0
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                read = int(line.split()[1])
    return {"read_bytes": read, "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}


def rss_file() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def write_random_4bit(cfg, folder: Path, dtype: torch.dtype) -> dict:
    """Write a whole-model offload folder for ``cfg`` with random weights, in the 4-bit layout, layer by layer.

    Each linear layer gets uniformly random NF4 codes (the code distribution of a quantized Gaussian: NF4's
    levels are its quantiles) with the absmax statistics of a quantized N(0, 0.02) weight of the same shape,
    computed once per shape. Norms are ones; embeddings and head are N(0, 0.02) in ``dtype``.
    """
    import bitsandbytes.functional as bnbF
    from tqdm.auto import tqdm

    from qlora_kit.offload.build import add_4bit, quantized_linears, skeleton
    from qlora_kit.offload.runtime import OffloadWriter

    model = skeleton(cfg, dtype)  # meta: shapes and names only
    linears = set(quantized_linears(model))
    gen = torch.Generator().manual_seed(0)
    templates: dict[tuple, object] = {}
    params = list(model.named_parameters())
    meta = {"config": cfg.to_dict(), "quant_layers": {}, "source": {"random": "bench_offload.write_random_4bit"}}
    with OffloadWriter(folder, meta) as w:
        for name, p in tqdm(params, desc="writing the 4-bit file", unit="tensor"):
            module = name.removesuffix(".weight")
            if module in linears and name.endswith(".weight"):
                shape = tuple(p.shape)  # [out, in]
                if shape not in templates:
                    sample = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
                    templates[shape] = bnbF.quantize_4bit(sample, blocksize=64, compress_statistics=True,
                                                          quant_type="nf4")[1]
                    del sample
                packed = torch.randint(0, 256, (p.numel() // 2, 1), dtype=torch.uint8, generator=gen)
                add_4bit(w, module, packed, templates[shape])  # [out * in / 2, 1]: two codes per byte
            elif p.dim() == 1:
                w.add(name, torch.ones(p.shape, dtype=dtype))
            else:
                w.add(name, (torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
    return w.index


def time_steps(model, steps: int, ids: torch.Tensor, rank: int, rec=None, label: str = "step") -> list[dict]:
    """Attach LoRA, run ``steps`` optimizer steps on ``ids``; per step: seconds, loss, disk reads, peaks."""
    from qlora_kit import LoraConfig, add_lora
    from qlora_kit.config import TrainingConfig
    from qlora_kit.testing.measure import train_steps
    from qlora_kit.training.optim import build_optimizer

    add_lora(model, LoraConfig(r=rank, alpha=2 * rank))
    model.train()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad],
                          TrainingConfig(optimizer="adamw", lr=1e-4), torch.device("cpu"))
    out = []
    for i in range(steps):
        before = io_counters()
        if rec is not None:
            loss = rec.run(f"{label} {i + 1}", train_steps, model, opt, ids, 1, "chunked")[0]
            stats = rec.phases[-1]
            seconds, peak_anon = stats.seconds, stats.peak_anon
        else:
            start = time.perf_counter()
            loss = train_steps(model, opt, ids, 1, "chunked")[0]
            seconds, peak_anon = time.perf_counter() - start, None
        after = io_counters()
        out.append({"seconds": seconds, "loss": loss, "read_bytes": after["read_bytes"] - before["read_bytes"],
                    "major_faults": after["major_faults"] - before["major_faults"], "peak_anon": peak_anon,
                    "rss_file": rss_file()})
        print(f"  {label} {i + 1}: {seconds:.1f} s, loss {loss:.4f}, read {out[-1]['read_bytes'] / GB:.2f} GB",
              flush=True)
    return out


def run_offload(args, cfg) -> int:
    from qlora_kit.atomic import atomic_write_json
    from qlora_kit.hardware import available_memory
    from qlora_kit.model.load import prepare_for_kbit_training
    from qlora_kit.offload.build import build_from_folder
    from qlora_kit.offload.runtime import DATA_NAME
    from qlora_kit.planning.memory import plan_memory
    from qlora_kit.planning.offload import (
        drop_page_cache,
        offload_traffic,
        page_cache_for_weights,
        read_bandwidth,
    )
    from qlora_kit.testing.measure import PhaseRecorder, read_status

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.compute_dtype]
    out = Path(args.out)
    folder = out / "offload"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    traffic = offload_traffic(cfg.to_dict(), "disk", True, compute_dtype=args.compute_dtype)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if not (folder / DATA_NAME).is_file() and free < traffic.file_bytes + 2 * GB:
        sys.exit(f"error: {out} has {free / GB:.1f} GB free; the 4-bit file needs {traffic.file_bytes / GB:.1f} GB. "
                 "Free space, pick --out elsewhere, or use fewer --layers")
    plan = plan_memory(cfg.to_dict(), seq_len=args.seq_len, batch=1, rank=args.rank, optimizer="adamw",
                       grad_checkpointing=True, compute_dtype=args.compute_dtype, device="cpu", device_memory=ram,
                       offload="disk")
    print(plan, flush=True)
    rec = PhaseRecorder(read_status()[0])
    result = {"config": {k: v for k, v in vars(args).items()}, "ram_bytes": ram, "file_bytes_planned": traffic.file_bytes,
              "plan_total": plan.total, "plan_fits": plan.fits}
    save = lambda: atomic_write_json(out / "offload-results.json", result)  # noqa: E731

    if (folder / DATA_NAME).is_file() and args.keep:
        print(f"reusing {folder}", flush=True)
    else:
        rec.run("write 4-bit file", write_random_4bit, cfg, folder, dtype)
        result["write_seconds"] = rec.phases[-1].seconds
    result["file_bytes"] = (folder / DATA_NAME).stat().st_size
    result["bandwidth"] = read_bandwidth(folder / DATA_NAME)
    print(f"4-bit file {result['file_bytes'] / GB:.1f} GB; cold read {result['bandwidth'] / GB:.2f} GB/s", flush=True)
    save()
    try:
        ids = torch.randint(3, min(cfg.vocab_size, 30000), (1, args.seq_len), generator=torch.Generator().manual_seed(1))
        warm = {}
        small, large = (2, 6) if cfg.num_hidden_layers >= 6 else (1, cfg.num_hidden_layers)
        for k in (small, large):  # compute time without I/O: a few layers of the same file stay in the page cache
            model = build_from_folder(folder, dtype, num_layers=k)
            prepare_for_kbit_training(model, dtype, True)
            steps = time_steps(model, 3, ids, args.rank, label=f"{k} layers")
            warm[k] = min(s["seconds"] for s in steps[1:])
            del model
        per_layer = (warm[large] - warm[small]) / (large - small)
        fixed = warm[small] - small * per_layer
        compute = fixed + cfg.num_hidden_layers * per_layer
        result["warm"] = {"step_seconds": warm, "per_layer": per_layer, "fixed": fixed, "compute_predicted": compute}
        save()

        model = rec.run("build model on the file", build_from_folder, folder, dtype)
        prepare_for_kbit_training(model, dtype, True)
        drop_page_cache(folder / DATA_NAME)  # the whole step from a cold cache
        cache = page_cache_for_weights(plan, available_memory(torch.device("cpu")))
        traffic = offload_traffic(cfg.to_dict(), "disk", True, compute_dtype=args.compute_dtype,
                                  cache_bytes=cache, bandwidth=result["bandwidth"])
        print(traffic, flush=True)
        result["traffic"] = {**vars(traffic), "first_step_moved": traffic.first_step_bytes}
        result["step_predicted"] = compute + traffic.seconds
        save()
        result["steps"] = time_steps(model, args.steps, ids, args.rank, rec=rec, label="70B-class step"
                                     if cfg.num_hidden_layers >= 80 else "step")
        result["phases"] = [vars(p) for p in rec.phases]
        result["baseline_anon"] = rec.baseline
        save()
        rec.sampler.stop()
        print_offload(result, cfg)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def print_offload(r: dict, cfg) -> None:
    """The results as Markdown (GB = 1e9 bytes)."""
    t, w = r["traffic"], r["warm"]
    print(f"\n{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, 4-bit file {r['file_bytes'] / GB:.1f} GB, "
          f"RAM {r['ram_bytes'] / GB:.1f} GB, cold read {r['bandwidth'] / GB:.2f} GB/s")
    print(f"planner: resident {r['plan_total'] / GB:.2f} GB; per micro-step {t['streamed_bytes'] / GB:.1f} GB used, "
          f"{t['moved_bytes'] / GB:.1f} GB read (first step from cold: {t['first_step_moved'] / GB:.1f} GB) "
          f"with {t['cache_bytes'] / GB:.1f} GB of page cache")
    print(f"compute without I/O: {w['fixed']:.1f} s + {w['per_layer']:.2f} s/layer -> {w['compute_predicted']:.0f} s; "
          f"predicted step {r['step_predicted']:.0f} s")
    print("| step | time (s) | read from disk (GB) | major faults | peak RssAnon - baseline (GB) | RssFile (GB) | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, s in enumerate(r["steps"]):
        print(f"| {i + 1} | {s['seconds']:.0f} | {s['read_bytes'] / GB:.1f} | {s['major_faults']} | "
              f"{s['peak_anon'] / GB:.2f} | {s['rss_file'] / GB:.1f} | {s['loss']:.4f} |")
