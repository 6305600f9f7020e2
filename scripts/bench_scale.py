#!/usr/bin/env python
"""Scale on this machine: QLoRA-train a random Llama whose bf16 checkpoint is larger than RAM.

1. Writes a random-weight Llama checkpoint in bf16 safetensors shards, one shard at a time (each tensor is
   generated, the shard written, then freed), so the writer never holds the model.
2. Loads it in 4-bit NF4 + double quant with qlora_kit.load_model (transformers streams shard by shard).
3. Attaches LoRA to every linear layer and runs --steps optimizer steps with gradient checkpointing.
4. Saves the adapter, and merges it with qlora_kit.merging.pipeline.merge_and_export (streaming export) unless --no-merge.

For each phase it records wall time, peak RSS and peak anonymous RSS (RssAnon, sampled every millisecond;
RSS also counts the mmapped safetensors pages, which are reclaimable page cache) and the planner's
prediction. Results go to --out/results.json and are printed as a Markdown table. The multi-GB files are
deleted at the end unless --keep. A benchmark, not a test: run it on a quiet machine.

    python scripts/bench_scale.py                      # 13B-class: 40 layers, hidden 5120 (~26 GB bf16)
    python scripts/bench_scale.py --layers 4           # a quick rehearsal (~3 GB)

With ``--offload disk`` it shows the larger-than-memory path instead (defaults: a Llama-3-70B-shaped config,
fp32 compute, sequence 32, one step):

1. Writes the 4-bit layout directly (``qlora_kit.offload.runtime.OffloadWriter``): random NF4 codes for every linear
   layer with the absmax statistics of a quantized N(0, 0.02) weight of that shape, and random embeddings and
   head in the compute dtype. No 16-bit checkpoint is ever written.
2. Measures the disk's cold sequential read bandwidth on that file.
3. Times steps on the first 2 and 6 decoder layers of the same file (they stay in the page cache): the step
   time without I/O is ``fixed + layers * per_layer``.
4. Builds the whole model on the memory-mapped file (``offload_build.build_from_folder``), attaches LoRA to
   every linear layer and runs ``--steps`` optimizer steps from a cold page cache, recording per step the
   time, the bytes read from disk (/proc/self/io) and the peak anonymous RSS, next to the planner's
   prediction (``plan_memory(offload="disk")`` and ``offload_plan.offload_traffic``).

    python scripts/bench_scale.py --offload disk                # 70B-class, about 45 GB on disk
    python scripts/bench_scale.py --offload disk --layers 8     # a rehearsal (~6 GB)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="/tmp/qlora-kit-scale", help="work folder (checkpoint, adapter, merged model)")
    p.add_argument("--offload", default="none", choices=["none", "disk"],
                   help="disk: write the 4-bit layout directly and train with the base memory-mapped (see above)")
    p.add_argument("--hidden", type=int, help="default 5120; 8192 with --offload disk")
    p.add_argument("--intermediate", type=int, help="default 13824; 28672 with --offload disk")
    p.add_argument("--layers", type=int, help="default 40; 80 with --offload disk")
    p.add_argument("--heads", type=int, help="default 40; 64 with --offload disk")
    p.add_argument("--kv-heads", type=int, help="default 40; 8 with --offload disk")
    p.add_argument("--vocab", type=int, help="default 32000; 128256 with --offload disk")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest checkpoint shard, GB")
    p.add_argument("--seq-len", type=int, help="default 64; 32 with --offload disk")
    p.add_argument("--steps", type=int, help="default 2; 1 with --offload disk")
    p.add_argument("--compute-dtype", choices=["bf16", "fp32"], help="default bf16; fp32 with --offload disk")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on every linear layer (alpha = 2 * rank)")
    p.add_argument("--no-merge", action="store_true", help="skip the merge/export phase")
    p.add_argument("--keep", action="store_true", help="keep the multi-GB files")
    args = p.parse_args(argv)
    big = args.offload == "disk"
    defaults = dict(hidden=(5120, 8192), intermediate=(13824, 28672), layers=(40, 80), heads=(40, 64),
                    kv_heads=(40, 8), vocab=(32000, 128256), seq_len=(64, 32), steps=(2, 1),
                    compute_dtype=("bf16", "fp32"))
    for name, pair in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, pair[big])
    return args


def llama_config(args: argparse.Namespace):
    """The LlamaConfig of the random model (bos/eos ids inside the tiny tokenizer's vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")


def tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM parameter, in checkpoint order."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        shapes += [(pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,)),
                   (pre + "self_attn.q_proj.weight", (q, h)), (pre + "self_attn.k_proj.weight", (kv, h)),
                   (pre + "self_attn.v_proj.weight", (kv, h)), (pre + "self_attn.o_proj.weight", (h, q)),
                   (pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h)),
                   (pre + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]


def write_checkpoint(cfg, out: Path, shard_bytes: float) -> int:
    """Write random bf16 shards plus index, config and tokenizer to ``out``; return the bytes written."""
    from safetensors.torch import save_file

    from qlora_kit.atomic import atomic_write_json
    from qlora_kit.testing.tiny import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):  # plan the shards first, by size
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in members:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors  # never more than one shard in memory
        print(f"  wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return total


def check_disk(out: Path, need: float) -> None:
    """Exit with a clear message when ``out``'s filesystem has less than ``need`` bytes free."""
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need:
        sys.exit(f"error: {out} has {free / 1e9:.1f} GB free but this run needs about {need / 1e9:.1f} GB "
                 "(checkpoint plus merged export); free disk space, pick --out elsewhere, or use --no-merge/--layers")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.layers < 2:
        sys.exit("error: --layers must be at least 2")
    if args.offload == "disk":
        from bench_offload import run_offload

        return run_offload(args, llama_config(args))
    from qlora_kit import LoraConfig, add_lora, save_adapter
    from qlora_kit.atomic import atomic_write_json
    from qlora_kit.config import TrainingConfig
    from qlora_kit.model.load import load_model, model_bytes
    from qlora_kit.planning.memory import plan_memory
    from qlora_kit.testing.measure import PhaseRecorder, read_status, train_steps
    from qlora_kit.training.optim import build_optimizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = Path(args.out)
    cfg = llama_config(args)
    bf16 = 2 * sum(int(torch.Size(s).numel()) for _, s in tensor_shapes(cfg))
    check_disk(out, bf16 * (1 if args.no_merge else 2) + 2e9)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    plan = plan_memory(cfg.to_dict(), seq_len=args.seq_len, batch=1, optimizer="adamw", grad_checkpointing=True,
                       compute_dtype=args.compute_dtype, device="cpu", device_memory=ram)
    print(plan, flush=True)
    if not plan.fits:
        sys.exit("error: the planner says training does not fit this machine's RAM; use fewer --layers")
    rec = PhaseRecorder(read_status()[0])
    ckpt, adapter, merged = out / "checkpoint", out / "adapter", out / "merged"
    predicted = {"load 4-bit": plan.rows[0].bytes + plan.rows[1].bytes, "train": plan.total - plan.overhead}
    result = {"config": dict(vars(args)), "bf16_bytes": bf16, "ram_bytes": ram, "baseline_anon": rec.baseline}

    def phase(name, fn, *a, **kw):  # run, record, and save the results so far (a killed run keeps them)
        value = rec.run(name, fn, *a, **kw)
        result["phases"] = [{**vars(p), "planned": predicted.get(p.name)} for p in rec.phases]
        atomic_write_json(out / "results.json", result)
        print(f"  {name}: {rec.phases[-1].seconds:.0f} s, peak RssAnon {rec.phases[-1].peak_anon / 1e9:.2f} GB",
              flush=True)
        return value

    try:
        phase("write checkpoint", write_checkpoint, cfg, ckpt, args.shard_gb * 1e9)
        model, _ = phase("load 4-bit", load_model, ckpt, compute_dtype=args.compute_dtype,
                         gradient_checkpointing=True, device="cpu")
        result["model_bytes_4bit"] = model_bytes(model)
        phase("add LoRA", add_lora, model, LoraConfig(r=args.rank, alpha=2 * args.rank))
        model.train()
        opt = build_optimizer([p for p in model.parameters() if p.requires_grad],
                              TrainingConfig(optimizer="adamw", lr=1e-4), torch.device("cpu"))
        ids = torch.randint(3, 384, (1, args.seq_len))
        result["losses"] = phase("train", train_steps, model, opt, ids, args.steps, "chunked")
        phase("save adapter", save_adapter, model, adapter, base_model_name_or_path=str(ckpt))
        del model, opt
        if not args.no_merge:
            try:
                from qlora_kit.merging.pipeline import merge_and_export
            except ImportError:
                print("qlora_kit.merging.pipeline.merge_and_export is not available: merge skipped")
            else:
                phase("merge + export", merge_and_export, ckpt, adapter, merged, overwrite=True, verify=False,
                      progress=False)
        rec.sampler.stop()
        print_table(result)
    finally:
        if not args.keep:
            for d in (ckpt, merged):
                shutil.rmtree(d, ignore_errors=True)
    return 0


def print_table(result: dict) -> None:
    """The phases as a Markdown table (GB = 1e9 bytes)."""
    print(f"\nbf16 checkpoint {result['bf16_bytes'] / 1e9:.1f} GB, RAM {result['ram_bytes'] / 1e9:.1f} GB, "
          f"4-bit model {result['model_bytes_4bit'] / 1e9:.2f} GB, losses {result['losses']}")
    print("| phase | time (s) | peak RSS (GB) | peak RssAnon - baseline (GB) | planned (GB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for p in result["phases"]:
        planned = f"{p['planned'] / 1e9:.2f}" if p.get("planned") else ""
        print(f"| {p['name']} | {p['seconds']:.0f} | {p['peak_rss'] / 1e9:.2f} | {p['peak_anon'] / 1e9:.2f} | {planned} |")


if __name__ == "__main__":
    sys.exit(main())
