"""Rollout workers: Ray actors that run many episodes concurrently and feed the buffer.

A worker owns a tokenizer, a parser and an engine client; each ``run`` call gets a list of
``EpisodeJob``s, runs up to ``episodes_per_worker`` of them at once on its event loop, and puts
every finished trajectory into the buffer as soon as it ends (so a crash loses only episodes
still in flight). An episode whose engine or sandbox failed is retried, then recorded as failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from typing import Any, Callable

import ray

from relayrl.config import (AntihackConfig, BlackboxConfig, CompactionConfig, EnvConfig, EvalConfig, RolloutConfig,
                             SubagentConfig)
from relayrl.registry import envs, parsers
from relayrl.types import Trajectory

from .agent import AgentLimits, EpisodeJob, run_episode_with_retries
from .chat import ChatFormat
from .compaction import make_compactor
from .client import HttpEngineClient

log = logging.getLogger(__name__)


def make_env_factory(env_cfg: EnvConfig, eval_cfg: EvalConfig | None = None):
    """Resolve ``env.name`` and return a zero-argument constructor (checked at start-up).

    An env that takes ``hidden_paths`` (the coding env) also gets the job's task files, those of
    ``env.tasks`` and ``eval.tasks``, so that its sandboxes cover them (hidden tests, reference
    solutions)."""
    import relayrl.envs.coding  # noqa: F401  (registers the built-in envs)
    import relayrl.envs.toy  # noqa: F401
    import relayrl.envs.toy_delegate  # noqa: F401

    cls = envs.resolve(env_cfg.name, "env.name")
    kwargs = dict(env_cfg.kwargs)
    if "hidden_paths" in inspect.signature(cls).parameters:
        from relayrl.envs.coding import task_file_paths

        kwargs["hidden_paths"] = [*kwargs.get("hidden_paths", []), *task_file_paths(env_cfg, eval_cfg)]
    if env_cfg.system_prompt is not None:
        kwargs["system_prompt"] = env_cfg.system_prompt
    return lambda: cls(**kwargs)


def make_parser(name: str, key: str = "rollout.parser"):
    import relayrl.envs.toy_delegate  # noqa: F401  (its toy parsers)
    import relayrl.rollout.parsers  # noqa: F401  (registers the built-in parsers)

    return parsers.resolve(name, key)()


class RolloutWorker:
    def __init__(self, rollout_cfg: RolloutConfig, env_cfg: EnvConfig, tokenizer_path: str,
                 engine_urls: list[str], buffer: Any, request_timeout_s: float,
                 compaction_cfg: CompactionConfig | None = None,
                 antihack_cfg: AntihackConfig | None = None,
                 blackbox_cfg: BlackboxConfig | None = None,
                 subagent_cfg: SubagentConfig | None = None, eval_cfg: EvalConfig | None = None) -> None:
        from transformers import AutoTokenizer

        self.cfg = rollout_cfg
        self.env_factory = make_env_factory(env_cfg, eval_cfg)
        self.parser = make_parser(rollout_cfg.parser)
        self.compactor = make_compactor(compaction_cfg or CompactionConfig())
        self.chat = ChatFormat(AutoTokenizer.from_pretrained(tokenizer_path), self.parser)
        self.engine = HttpEngineClient(engine_urls, timeout_s=request_timeout_s)
        self.buffer = buffer
        self.gate = None
        if antihack_cfg is not None and antihack_cfg.enabled:
            from relayrl.antihack import make_gate

            self.gate = make_gate(antihack_cfg, self.engine, self.chat.tok)
        self.limits = AgentLimits(
            max_turns=rollout_cfg.max_turns,
            max_new_tokens=rollout_cfg.max_new_tokens,
            max_context_tokens=rollout_cfg.max_context_tokens,
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            env_call_timeout_s=env_cfg.call_timeout_s,
        )
        self._sem = asyncio.Semaphore(rollout_cfg.episodes_per_worker)
        self.runner = None
        if blackbox_cfg is not None and blackbox_cfg.enabled:
            self.runner = self._blackbox_runner(blackbox_cfg)
        self.spawner = None
        if subagent_cfg is not None and subagent_cfg.enabled:
            from .subagent import SpawnerFactory

            self.spawner = SpawnerFactory(subagent_cfg, self.limits, self.chat, self.parser)

    def _blackbox_runner(self, cfg: BlackboxConfig):
        from relayrl.envs.coding import make_sandbox_provider

        from .blackbox import run_blackbox_episode, sandbox_spec

        provider = make_sandbox_provider(sandbox_spec(cfg))

        async def run(job: EpisodeJob, env: Any) -> Trajectory:
            return await run_blackbox_episode(job, env, self.engine, self.chat, self.parser, self.limits, cfg,
                                              provider, gate=self.gate)
        return run

    async def _episode(self, job: EpisodeJob, limits: AgentLimits | None = None) -> Trajectory:
        return await run_episode_with_retries(job, self.env_factory, self.engine, self.chat, self.parser,
                                              limits or self.limits, self.cfg.max_episode_retries, self.compactor,
                                              gate=self.gate, runner=self.runner, spawner=self.spawner)

    async def _run_one(self, job: EpisodeJob) -> str:
        async with self._sem:
            traj = await self._episode(job)
        for sub in traj.sub_traces:
            sub.group_id, sub.task_index = job.group_id, job.task_index
        traj.metrics.setdefault("task_index", float(job.task_index))
        await self.buffer.put.remote(traj, job.group_id)
        return traj.trajectory_id

    async def run(self, jobs: list[EpisodeJob]) -> list[str]:
        """Run ``jobs`` concurrently; each trajectory goes to the buffer as it finishes."""
        return list(await asyncio.gather(*(self._run_one(j) for j in jobs)))

    async def evaluate(self, jobs: list[EpisodeJob], temperature: float, top_p: float = 1.0,
                       on_done: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
        """Run ``jobs`` as training would, but sampling at ``temperature`` / ``top_p`` (0 =
        greedy), and return their trajectories in order; nothing goes to the buffer.
        ``on_done(trajectory)`` is called as each one finishes (a progress bar)."""
        limits = dataclasses.replace(self.limits, temperature=temperature, top_p=top_p)

        async def one(job: EpisodeJob) -> Trajectory:
            async with self._sem:
                traj = await self._episode(job, limits)
            if on_done is not None:
                on_done(traj)
            return traj

        return list(await asyncio.gather(*(one(j) for j in jobs)))

    async def close(self) -> None:
        await self.engine.close()


RolloutWorkerActor = ray.remote(RolloutWorker)
