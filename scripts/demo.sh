#!/usr/bin/env bash
# The README's main job: set up .venv, then run the demo fine-tune on SmolLM2-135M-Instruct (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
exec python -m qlora_kit demo "$@"
