#!/usr/bin/env python
"""Export a fine-tuned model for serving (transformers, vLLM, TGI, GGUF converters).

A thin wrapper of ``qlora_kit.merge_and_export``: merges the adapter, streams out plain safetensors shards
with config, generation config and tokenizer, verifies them, and prints how to use the folder.

    python scripts/export_model.py --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype auto|bf16|fp16|fp32]
        [--merge-base dequantized|original] [--shard-size 2GB] [--overwrite] [--no-verify]
"""
import argparse
import sys

from qlora_kit import merge_and_export
from qlora_kit.atomic import WriteError
from qlora_kit.config import ConfigError
from qlora_kit.dtypes import NAMES as DTYPE_NAMES
from qlora_kit.merging.report import format_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto")
    p.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized")
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args(argv)
    try:
        report = merge_and_export(args.base, args.adapter, args.out, merge_base=args.merge_base, dtype=args.dtype,
                                  overwrite=args.overwrite, verify=not args.no_verify, shard_size=args.shard_size)
    except (ConfigError, FileExistsError, WriteError) as e:  # bad input or a failed write: one line, as the CLI
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    print(f"\nload it anywhere transformers runs:\n  AutoModelForCausalLM.from_pretrained({args.out!r})\n"
          f"serve it: vllm serve {args.out}   |   convert it: python convert_hf_to_gguf.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
