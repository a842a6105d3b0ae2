"""An env that raises, hangs or loses its sandbox fails its episode, never the worker: the
trajectory comes back marked failed with the error and its kind; sandbox loss is retried."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from relayrl.envs.sandbox import SandboxError
from relayrl.envs.toy import ToyEchoEnv
from relayrl.rl.job import rollout_metrics
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode_with_retries
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.parsers import PlainParser

TASK = ToyEchoEnv.default_tasks(num_tasks=1)[0]


class Counting(ToyEchoEnv):
    made = 0
    closed = 0

    def __init__(self) -> None:
        super().__init__(num_turns=3)
        type(self).made += 1

    async def close(self) -> None:
        type(self).closed += 1


class Raising(Counting):
    async def step(self, call):
        raise RuntimeError("a bug in the user's env")


class Hanging(Counting):
    async def step(self, call):
        await asyncio.sleep(60)


class SandboxLostOnce(Counting):
    async def reset(self, task):
        if type(self).made == 1:
            raise SandboxError("sandbox server http://x:8700 is gone")
        return await super().reset(task)


class SandboxAlwaysLost(Counting):
    async def reset(self, task):
        raise SandboxError("sandbox server http://x:8700 is gone")


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    engine = CpuEngine(tiny_model_dir, max_batch_size=4, max_seq_len=256, num_threads=1)
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), PlainParser())
    yield engine, chat
    engine.shutdown()


def run(parts, env_cls, retries=2, timeout_s=None):
    env_cls.made = env_cls.closed = 0
    engine, chat = parts
    limits = AgentLimits(max_turns=3, max_new_tokens=2, max_context_tokens=256, env_call_timeout_s=timeout_s)
    job = EpisodeJob(task=TASK, task_index=0, seed=1)
    return asyncio.run(run_episode_with_retries(job, env_cls, engine, chat, PlainParser(), limits, retries))


def test_healthy_episode(parts):
    traj = run(parts, Counting)
    assert not traj.failed and len(traj.sub_traces) == 1
    assert Counting.made == 1 and Counting.closed == 1


def test_env_bug_fails_the_episode_without_retry(parts):
    traj = run(parts, Raising)
    assert traj.failed and traj.failure_kind == "env_error"
    assert "RuntimeError: a bug in the user's env" in traj.error
    assert Raising.made == 1 and Raising.closed == 1


def test_hanging_env_times_out(parts):
    traj = run(parts, Hanging, timeout_s=0.5)
    assert traj.failed and traj.failure_kind == "env_timeout"
    assert traj.error == "env.step took longer than env.call_timeout_s=0.5s"
    assert Hanging.made == 1 and Hanging.closed == 1


def test_lost_sandbox_is_retried(parts):
    traj = run(parts, SandboxLostOnce)
    assert not traj.failed
    assert SandboxLostOnce.made == 2 and SandboxLostOnce.closed == 2


def test_sandbox_lost_every_time_fails_after_the_retries(parts):
    traj = run(parts, SandboxAlwaysLost, retries=2)
    assert traj.failed and traj.failure_kind == "sandbox" and "is gone" in traj.error
    assert SandboxAlwaysLost.made == 3 and SandboxAlwaysLost.closed == 3


def test_failures_are_counted_by_kind_in_metrics(parts):
    groups = [[run(parts, Counting), run(parts, Raising)], [run(parts, SandboxAlwaysLost, retries=0)]]
    m = rollout_metrics(groups, [s for g in groups for t in g for s in t.sub_traces])
    assert m["rollout/failed"] == 2.0
    assert m["rollout/failed_env_error"] == 1.0 and m["rollout/failed_sandbox"] == 1.0
    assert m["rollout/failed_engine"] == 0.0 and m["rollout/failed_env_timeout"] == 0.0
