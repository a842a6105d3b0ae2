"""The example package's env, named only by dotted path in its own YAML, trains end to end
through the CLI (a real Ray cluster in a subprocess; the tiny model stands in for SmolLM2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sqlite_env"


def test_example_config_trains(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "relayrl", "train", str(EXAMPLE / "config.yaml"),
           f"run.output_dir={tmp_path}", f"model.path={tiny_model_dir}", "train.steps=1",
           "rollout.tasks_per_step=2", "rollout.max_new_tokens=4", "rollout.max_context_tokens=768",
           "engine.max_seq_len=1024", "engine.num_threads=1", "trainer.micro_batch_size=4",
           "logging.progress=false", "ray.num_cpus=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp_path / "sqlite-example"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert metrics[0]["rollout/trajectories"] == 4.0 and metrics[0]["rollout/failed"] == 0.0
    assert "rollout/env/answered" in metrics[0]  # the example env's own details reach the metrics
    assert (run_dir / "checkpoints" / "step_000001" / "policy").is_dir()
