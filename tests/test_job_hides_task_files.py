"""A job's own task files (``env.tasks`` and ``eval.tasks``: hidden tests, reference solutions)
cannot be read from the coding env's sandboxes: the env factory the job and ``relayrl eval``
use hands them to the env as ``hidden_paths``."""

from __future__ import annotations

import asyncio
import json

import pytest

from relayrl.config import load_config
from relayrl.envs.local_sandbox import probe_mode
from relayrl.envs.taskgen import generate_tasks
from relayrl.rollout.worker import make_env_factory
from relayrl.types import ToolCall

pytestmark = pytest.mark.skipif(probe_mode() != "root", reason="the full sandbox needs root (CI runs as root)")


def test_train_and_eval_task_files_are_hidden(tmp_path):
    train, held_out = tmp_path / "train" / "tasks.jsonl", tmp_path / "held_out.jsonl"
    train.parent.mkdir()
    tasks = generate_tasks("train", n=2)
    train.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    held_out.write_text(json.dumps(generate_tasks("heldout", n=1)[0]) + "\n")
    cfg = load_config(None, ["env.name=coding", f"env.tasks={train}", f"eval.tasks={held_out}"])
    env = make_env_factory(cfg.env, cfg.eval)()

    async def episode() -> list[str]:
        await env.reset(tasks[0])
        try:
            out = []
            for path in (train, held_out):
                result = await env.step(ToolCall("bash", {"command": f"cat {path}; ls {path.parent}"}))
                out.append(result.observation)
            return out
        finally:
            await env.close()

    for observation in asyncio.run(episode()):
        assert "hidden_tests" not in observation and "def test_" not in observation, observation[:400]
    # The same factory without an eval section still hides the training tasks.
    assert str(train) in make_env_factory(cfg.env)().hidden_paths
