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
    return parser


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
