#!/usr/bin/env bash
# Set up (if needed), train configs/quickstart.yaml, then plot its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/relayrl train configs/quickstart.yaml "$@"
.venv/bin/relayrl report runs/quickstart
