"""`relayrl train` turns user mistakes found at start-up into one paragraph and exit code 2,
before Ray or any model is started."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_train(*overrides: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayrl", "train", str(cwd / "c.yaml"), *overrides],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["env.name=no_such_env"], "env.name"),
        (["env.name=no_such_pkg.mod:Env"], "env.name"),
        (["model.path=/no/such/model"], "model.path"),
        (["env.tasks=missing.jsonl"], "env.tasks"),
        (["rollout.parser=nope"], "rollout.parser"),
        (["env.kwargs={num_turns: 0}"], "env.kwargs"),
        (["run.resume=true"], "run.resume"),
    ],
)
def test_start_up_errors_name_the_key(tmp_path, tiny_model_dir, overrides, key):
    (tmp_path / "c.yaml").write_text(
        f"run: {{output_dir: {tmp_path}/runs, name: r}}\nmodel: {{path: {tiny_model_dir}}}\n"
        "rollout: {parser: plain}\nlogging: {wandb: disabled, progress: false}\n")
    proc = run_train(*overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
