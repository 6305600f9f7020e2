#!/usr/bin/env bash
# Create .venv once and install qlora-kit into it, with the CPU build of torch.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips work already done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing qlora-kit and its dependencies into .venv (about a minute)..."
  # torch first and pinned: pip finds the 2.13.0 CPU wheel on this machine's disk, while an unpinned
  # "torch" pulled in by another package would download a multi-GB CUDA build.
  python -m pip install -q --disable-pip-version-check "torch==${QLORA_KIT_TORCH:-2.13.0}" 2>&1 | grep -v "is ignored" || true
  python -W ignore -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
  python -m pip install -q --disable-pip-version-check -e ".[test,bench]" 2>&1 | grep -v "is ignored" || true
  python -c "import qlora_kit, bitsandbytes, peft" || { echo "qlora-kit failed to install" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
