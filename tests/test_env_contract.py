"""``relayrl envs check``: the contract passes for the built-in envs, the example package's env
and the remote sandbox client, and fails, naming the property, for an env that breaks it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relayrl.envs.base import Reset, Score, StepResult
from relayrl.envs.check import run_check
from relayrl.envs.contract import check_env
from relayrl.envs.toy import ToyEchoEnv

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sqlite_env"


def failed(results) -> dict[str, str]:
    return {r.name: r.detail for r in results if not r.ok}


def test_toy_env_passes():
    results, n = run_check("toy_echo", {"num_turns": 2}, None, limit=4)
    assert n == 4 and failed(results) == {}
    assert sum(r.name.endswith("reference scores 1.0, no action less") for r in results) == 4


def test_coding_env_passes_with_a_local_sandbox():
    results, n = run_check("coding", {"sandbox": {"kind": "local", "timeout_s": 20}}, None, limit=2)
    assert n == 2 and failed(results) == {}
    names = {r.name for r in results}
    assert "sandbox: a command past its timeout is killed" in names and "sandbox: network isolation" in names


def test_example_package_env_passes_through_the_cli():
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE)}
    proc = subprocess.run([sys.executable, "-m", "relayrl", "envs", "check", "relayrl_sqlite_env:SqliteQueryEnv",
                           "--all-tasks"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "14 passed, 0 failed" in proc.stdout  # 13 contract checks and the env's preflight


def test_unknown_env_is_a_user_error():
    proc = subprocess.run([sys.executable, "-m", "relayrl", "envs", "check", "no_such_pkg.mod:Env"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "cannot import 'no_such_pkg.mod:Env'" in proc.stderr and "Traceback" not in proc.stderr


class _Fragile(ToyEchoEnv):
    """Breaks three properties: raises on an unknown tool, returns a NaN reward, and its
    reference solution does not score 1.0."""

    async def step(self, call):
        if call.name != "answer":
            raise KeyError(call.name)
        return await super().step(call)

    async def score(self) -> Score:
        return Score(reward=float("nan"))

    @staticmethod
    def reference_calls(task):
        return []


def test_a_broken_env_fails_the_named_checks():
    tasks = ToyEchoEnv.default_tasks(num_tasks=1)
    results = asyncio.run(check_env(_Fragile, tasks))
    bad = failed(results)
    assert set(bad) == {"malformed tool calls become observations", "score after no action",
                        "task echo-0: reference scores 1.0, no action less"}
    assert bad["malformed tool calls become observations"].startswith("unknown tool: step raised KeyError")
    assert bad["score after no action"] == "reward nan is not finite"


class _NoTools:
    async def reset(self, task):
        return Reset(messages=[{"role": "user"}])

    async def step(self, call):
        return StepResult("")

    async def score(self):
        return Score(0.0)

    async def close(self):
        pass


def test_bad_reset_stops_the_episode_checks():
    results = asyncio.run(check_env(_NoTools, [{"id": "x"}]))
    assert [r.name for r in results] == ["tasks are valid", "reset returns messages and tool schemas"]
    assert not results[1].ok and "is not {role: str, content: str}" in results[1].detail
