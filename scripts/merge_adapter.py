#!/usr/bin/env python
"""Merge a LoRA adapter into its base model: a thin wrapper of ``qlora-kit merge`` (same arguments).

    python scripts/merge_adapter.py --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype fp32] ...

See ``qlora-kit merge --help`` and the README section "Merge and export".
"""
import sys

from qlora_kit.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
