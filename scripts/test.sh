#!/usr/bin/env bash
# The README's test command: set up .venv, then run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m real_model` for the slower tests on the real demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m ruff check -q qlora_kit tests scripts  # the linter (pyproject.toml [tool.ruff]) before the tests
exec python -m pytest -q -p no:cacheprovider "$@"
