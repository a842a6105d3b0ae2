#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A crash (also one at interpreter exit, after the summary) prints every thread's Python stack.
export PYTHONFAULTHANDLER=1
exec .venv/bin/python -m pytest -q "$@"
