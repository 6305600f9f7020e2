"""The ``qlora-kit`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    return run_demo(args)


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
