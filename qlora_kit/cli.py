"""The ``qlora-kit`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from qlora_kit.config import ConfigError, TrainConfig, load_train_config
from qlora_kit.dtypes import NAMES
from qlora_kit.optimizers import OPTIMIZER_NAMES


def _load_config(args: argparse.Namespace) -> TrainConfig:
    """The run config of ``train``/``validate``: a YAML file and/or key=value overrides (a first positional
    argument with "=" that is not a .yaml file is an override, not a file)."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)  # only overrides, no YAML file
        args.config = None
    from qlora_kit.demo.model import resolve_model_path

    return load_train_config(args.config, args.overrides, resolve_model=resolve_model_path)


def _cmd_demo(args: argparse.Namespace) -> int:
    from qlora_kit.demo.run import run_demo

    return run_demo(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from qlora_kit.training.recipe import train

    config = _load_config(args)
    result = train(config, resume=args.resume, force=args.force, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun/accelerate launch only rank 0 reports
        return 0
    if result.status == "interrupted":
        print(f"interrupted: checkpoint saved at step {result.steps}. Resume with:\n  qlora-kit train "
              f"{args.config or ''} {' '.join(args.overrides)} --resume".replace("  ", " "))
    else:
        print(f"{result.status}: adapter in {result.adapter_dir}; try it with:\n  qlora-kit generate "
              f"--model {config.model.path} --adapter {result.adapter_dir} \"your prompt\"")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from qlora_kit.training.validate import validate_run

    report = validate_run(_load_config(args), force=args.force)
    print(report.summary())
    print("ok: config, model folder and data are valid (no weights were loaded)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    if args.gguf:  # merge straight into a GGUF file: the export command with --quant from --gguf
        from qlora_kit.merging.gguf_cli import run_export

        args.quant, args.model = args.gguf, None
        return run_export(args)
    from qlora_kit.merging.pipeline import merge_and_export
    from qlora_kit.merging.report import format_summary
    from qlora_kit.merging.verify import VerificationError

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
    from qlora_kit.merging.resize import adapter_resize, format_resize_summary

    report = adapter_resize(args.adapter, args.out, args.rank, overwrite=args.overwrite)
    print(format_resize_summary(report))
    print(f"report: {args.out}/resize_report.json")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="load SmolLM2-135M-Instruct in 4-bit, report it, and generate")
    demo.add_argument("--prepare", action="store_true", help="only fetch and convert the demo model, then exit")
    demo.add_argument("--output", help="run folder (default: runs/demo-<timestamp>)")
    demo.add_argument("--epochs", type=float, default=1.0, help="training epochs over the 600 demo examples")
    demo.set_defaults(func=_cmd_demo)


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="fine-tune with LoRA from a YAML config")
    tr.add_argument("config", nargs="?", help="YAML config with model, quant, lora, data and training sections")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=8 training.lr=1e-4")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    tr.add_argument("--force", action="store_true", help="run even if the memory plan needs over 1.5x the free memory")
    tr.add_argument("--overwrite", action="store_true",
                    help="train into a non-empty folder (its files are moved aside, never deleted) or over a finished run")
    tr.set_defaults(func=_cmd_train)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    va = sub.add_parser("validate", help="check config, model folder and every data record; print a data summary")
    va.add_argument("config", nargs="?", help="YAML config, as for train")
    va.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.max_seq_len=1024")
    va.add_argument("--force", action="store_true", help="do not refuse a run the memory plan says cannot fit")
    va.set_defaults(func=_cmd_validate)



def _add_inference(sub: argparse._SubParsersAction) -> None:
    """generate and eval: their parsers and handlers live in inference/commands.py."""
    from qlora_kit.inference.commands import add_parsers

    add_parsers(sub)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    from qlora_kit.merging.gguf_map import QUANT_TYPES

    mg = sub.add_parser("merge", help="merge an adapter into its base and export a plain safetensors model")
    mg.add_argument("--base", required=True, help="the base checkpoint folder the adapter was trained on")
    mg.add_argument("--adapter", required=True, help="the adapter folder (PEFT format)")
    mg.add_argument("--out", required=True, help="output folder (written atomically)")
    mg.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                    help="add the adapter to dequant(quant(W)) as trained (default) or to the original W")
    mg.add_argument("--dtype", choices=["auto", *NAMES], default="auto",
                    help="output dtype; auto (default): the checkpoint's, or fp32 when that cast would erase the adapter")
    mg.add_argument("--requantize", choices=["nf4", "fp4"],
                    help="save a 4-bit model; the report says how much of the adapter survives (exit 3 if lost)")
    mg.add_argument("--overwrite", action="store_true", help="replace an earlier merge output at --out")
    mg.add_argument("--no-verify", action="store_true", help="skip reloading and comparing the merged model")
    mg.add_argument("--eval-file", help="JSONL records: report eval loss of 4-bit + adapter and of both merges")
    mg.add_argument("--rank", type=int, help="merge only the first RANK components (dynamic-rank adapters)")
    mg.add_argument("--shard-size", default="2GB", help="largest output shard (default 2GB)")
    mg.add_argument("--gguf", metavar="QUANT", type=str.lower, choices=QUANT_TYPES,
                    help="write a GGUF file to --out (*.gguf) instead, e.g. --gguf q8_0 (see `qlora-kit export`)")
    mg.set_defaults(func=_cmd_merge)


def _add_adapter_resize(sub: argparse._SubParsersAction) -> None:
    rs = sub.add_parser("adapter-resize", help="shrink an adapter's rank by truncated SVD of each update")
    rs.add_argument("--adapter", required=True, help="the adapter folder to shrink")
    rs.add_argument("--out", required=True, help="folder for the smaller adapter")
    rs.add_argument("--rank", type=int, required=True, help="the new rank (at most the adapter's)")
    rs.add_argument("--overwrite", action="store_true", help="replace an earlier resize output at --out")
    rs.set_defaults(func=_cmd_adapter_resize)


def _add_rank_sweep(sub: argparse._SubParsersAction) -> None:
    """rank-sweep: evaluate a dynamic-rank adapter at several ranks, recommend one (its parser lives with it)."""
    from qlora_kit.inference.rank_sweep import add_parser

    add_parser(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="predict peak memory of a QLoRA fine-tune from a config.json, without loading it")
    pl.add_argument("--model", required=True, help="checkpoint folder, config.json, or a shipped name (e.g. llama-3.1-70b)")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--objective", choices=["sft", "dpo", "orpo"], default="sft",
                    help="dpo/orpo: each of the --batch examples is a pair, two sequences of --seq-len (its longer side)")
    pl.add_argument("--rank", type=int, default=16)
    pl.add_argument("--targets", default="all-linear", help="all-linear or comma-separated names (q_proj,v_proj)")
    pl.add_argument("--optimizer", default="paged_adamw_8bit", choices=OPTIMIZER_NAMES)
    pl.add_argument("--grad-checkpointing", choices=["on", "off"], default="on")
    pl.add_argument("--device-memory", help="memory per device with its unit, e.g. 24GB (GB means GiB, as on GPU "
                                            "spec sheets; a number without a unit is an error)")
    pl.add_argument("--compute-dtype", choices=NAMES, default="bf16")
    pl.add_argument("--devices", type=int, default=1)
    pl.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="which framework overhead to add")
    pl.add_argument("--unchunked-loss", action="store_true", help="plan for full-vocabulary logits (HF loss)")
    pl.add_argument("--offload", choices=["none", "cpu", "disk"], default="none",
                    help="frozen 4-bit base offloaded (model.offload): also predicts the bytes streamed per step")
    pl.add_argument("--bandwidth", type=float,
                    help="with --offload: disk read (or host-to-device) bandwidth in GB/s, to predict the added time")
    pl.set_defaults(func=_cmd_plan)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """export: a GGUF file for llama.cpp / Ollama, verified (its parser lives with it)."""
    from qlora_kit.merging.gguf_cli import add_parser

    add_parser(sub)


SUBCOMMANDS = (_add_demo, _add_train, _add_validate, _add_inference, _add_merge, _add_export, _add_adapter_resize,
               _add_rank_sweep, _add_plan)  # each adds one subcommand's parser; the order is the order of --help


def build_parser() -> argparse.ArgumentParser:
    """The ``qlora-kit`` argument parser: global flags and one subparser per entry of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog="qlora-kit", description="Quantized low-memory LoRA fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    from qlora_kit.planning.fit import rows_per_example
    from qlora_kit.planning.memory import plan_memory

    batch = args.batch * rows_per_example(args.objective)
    plan = plan_memory(args.model, seq_len=args.seq_len, batch=batch, rank=args.rank, targets=args.targets,
                       optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing == "on",
                       device_memory=args.device_memory, compute_dtype=args.compute_dtype,
                       chunked_loss=not args.unchunked_loss, devices=args.devices, strategy=args.strategy,
                       device=args.device, offload=args.offload)
    print(plan)
    if args.offload != "none":
        from qlora_kit.planning.offload import offload_traffic, page_cache_for_weights

        cache = page_cache_for_weights(plan, plan.device_memory) if args.offload == "disk" and plan.device_memory else 0
        print(offload_traffic(args.model, args.offload, args.grad_checkpointing == "on", compute_dtype=args.compute_dtype,
                              cache_bytes=cache, bandwidth=args.bandwidth * 1e9 if args.bandwidth else None))
    return 0 if plan.fits is not False else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qlora-kit`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        for flag in ("model", "base"):  # --model/--base demo: the demo model (generate, eval, merge, export, ...)
            if getattr(args, flag, None) == "demo":
                from qlora_kit.demo.model import resolve_model_path

                setattr(args, flag, str(resolve_model_path("demo")))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints and exits cleanly)
        print("error: interrupted again: stopped at once without saving this step; the last checkpoint is kept "
              "(continue with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors get one clear line; anything else is a bug: show the traceback
        if not _is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; 4: the training run was stopped as diverged


def _is_user_error(e: Exception) -> bool:
    """Errors that describe bad input or a failed write, whose message already says what to do."""
    from qlora_kit.atomic import WriteError
    from qlora_kit.data import DataError
    from qlora_kit.model.adapters import AdapterMismatchError
    from qlora_kit.training.run import TrainingError

    return isinstance(e, (ConfigError, DataError, AdapterMismatchError, TrainingError, WriteError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
