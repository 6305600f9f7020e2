"""The ``qlora-kit`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    return run_demo(args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_and_export
    from .verify import VerificationError, format_summary

    try:
        report = merge_and_export(args.base, args.adapter, args.out, merge_base=args.merge_base, dtype=args.dtype,
                                  requantize=args.requantize, overwrite=args.overwrite, verify=not args.no_verify,
                                  eval_file=args.eval_file, shard_size=args.shard_size, rank=args.rank)
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(report))
    print(f"report: {args.out}/merge_report.json")
    return 3 if (report.get("requantized") or {}).get("adapter_lost") else 0


def _cmd_adapter_resize(args: argparse.Namespace) -> int:
    from .resize import adapter_resize, format_resize_summary

    report = adapter_resize(args.adapter, args.out, args.rank, overwrite=args.overwrite)
    print(format_resize_summary(report))
    print(f"report: {args.out}/resize_report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="Quantized low-memory LoRA fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load SmolLM2-135M-Instruct in 4-bit, report it, and generate")
    demo.add_argument("--prepare", action="store_true", help="only fetch and convert the demo model, then exit")
    demo.set_defaults(func=_cmd_demo)

    pl = sub.add_parser("plan", help="predict peak memory of a QLoRA fine-tune from a config.json, without loading it")
    pl.add_argument("--model", required=True, help="checkpoint folder, config.json, or a shipped name (e.g. llama-3.1-70b)")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--rank", type=int, default=16)
    pl.add_argument("--targets", default="all-linear", help="all-linear or comma-separated names (q_proj,v_proj)")
    pl.add_argument("--optimizer", default="paged_adamw_8bit",
                    choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
    pl.add_argument("--grad-checkpointing", choices=["on", "off"], default="on")
    pl.add_argument("--device-memory", help="memory per device, e.g. 24GB (GB means GiB, as on GPU spec sheets)")
    pl.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    pl.add_argument("--devices", type=int, default=1)
    pl.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="which framework overhead to add")
    pl.add_argument("--unchunked-loss", action="store_true", help="plan for full-vocabulary logits (HF loss)")
    pl.set_defaults(func=_cmd_plan)

    mg = sub.add_parser("merge", help="merge an adapter into its base and export a plain safetensors model")
    mg.add_argument("--base", required=True, help="the base checkpoint folder the adapter was trained on")
    mg.add_argument("--adapter", required=True, help="the adapter folder (PEFT format)")
    mg.add_argument("--out", required=True, help="output folder (written atomically)")
    mg.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                    help="add the adapter to dequant(quant(W)) as trained (default) or to the original W")
    mg.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the checkpoint's)")
    mg.add_argument("--requantize", choices=["nf4", "fp4"],
                    help="save a 4-bit model; the report says how much of the adapter survives (exit 3 if lost)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    mg.add_argument("--no-verify", action="store_true", help="skip reloading and comparing the merged model")
    mg.add_argument("--eval-file", help="JSONL records: report eval loss of 4-bit + adapter and of both merges")
    mg.add_argument("--rank", type=int, help="merge only the first RANK components (dynamic-rank adapters)")
    mg.add_argument("--shard-size", default="2GB", help="largest output shard (default 2GB)")
    mg.set_defaults(func=_cmd_merge)

    rs = sub.add_parser("adapter-resize", help="shrink an adapter's rank by truncated SVD of each update")
    rs.add_argument("--adapter", required=True, help="the adapter folder to shrink")
    rs.add_argument("--out", required=True, help="folder for the smaller adapter")
    rs.add_argument("--rank", type=int, required=True, help="the new rank (at most the adapter's)")
    rs.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    rs.set_defaults(func=_cmd_adapter_resize)
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    from .memory import plan_memory

    plan = plan_memory(args.model, seq_len=args.seq_len, batch=args.batch, rank=args.rank, targets=args.targets,
                       optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing == "on",
                       device_memory=args.device_memory, compute_dtype=args.compute_dtype,
                       chunked_loss=not args.unchunked_loss, devices=args.devices, strategy=args.strategy,
                       device=args.device)
    print(plan)
    return 0 if plan.fits is not False else 1




def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qlora-kit`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
