"""The white-box agent loop: one episode from ``env.reset`` to ``env.score``.

Per turn: generate from the exact token context, parse the tool call, step the env, append the
observation with loss_mask 0, until the env says done, the agent answers without a tool call,
or a cap (turns, context tokens) cuts the episode. A cap is truncation, not termination: the
sub-trace is marked ``terminal=False`` so GAE bootstraps from the critic's value there.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from relayrl.envs.base import Env, task_domain
from relayrl.envs.sandbox import SandboxError
from relayrl.types import Event, ParseError, SubTrace, ToolCall, Trajectory

from .chat import ChatFormat
from .engine import Engine, EngineError, GenerateRequest, SamplingParams

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class EpisodeJob:
    """One episode to run.

    task_index: position of the task in the run's data order (the same for a whole group).
    sample_index: which of the group's ``group_size`` episodes this is.
    seed: base of the per-turn sampling seeds (None = the engine's RNG).
    """

    task: dict[str, Any]
    task_index: int
    sample_index: int = 0
    seed: int | None = None

    @property
    def trajectory_id(self) -> str:
        return f"t{self.task_index:08d}-s{self.sample_index:03d}"

    @property
    def group_id(self) -> str:
        return f"t{self.task_index:08d}"


@dataclass
class AgentLimits:
    max_turns: int
    max_new_tokens: int
    max_context_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    env_call_timeout_s: float | None = None


class EnvTimeout(Exception):
    """An env call (reset, step, score) took longer than ``env.call_timeout_s``."""


async def call_env(awaitable: Awaitable[T], what: str, timeout_s: float | None) -> T:
    """Await an env call under the episode's env timeout."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise EnvTimeout(f"env.{what} took longer than env.call_timeout_s={timeout_s:g}s") from None


def turn_seed(base: int | None, turn: int) -> int | None:
    if base is None:
        return None
    return zlib.crc32(f"{base}:{turn}".encode()) & 0x7FFFFFFF


@dataclass
class _Context:
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def extend(self, ids: list[int], mask: int, logprobs: list[float] | None = None) -> None:
        self.tokens.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


async def run_episode(
    job: EpisodeJob,
    env: Env,
    engine: Engine,
    chat: ChatFormat,
    parser: Any,
    limits: AgentLimits,
    on_event: Callable[[Event], None] | None = None,
) -> Trajectory:
    """Run one episode to its end and return its trajectory (one sub-trace, no compaction)."""
    reset = await call_env(env.reset(job.task), "reset", limits.env_call_timeout_s)
    tools = reset.tools or None
    messages = chat.with_tool_instructions(list(reset.messages), reset.tools)
    ctx = _Context()
    ctx.extend(chat.prompt_ids(messages, tools), 0)
    events: list[Event] = []
    terminal = False
    weight_version: int | None = None
    turns = 0
    gen_tokens = 0

    for turn in range(limits.max_turns):
        budget = min(limits.max_new_tokens, limits.max_context_tokens - len(ctx.tokens))
        if budget <= 0:
            events.append(Event("truncated", turn, {"reason": "context"}))
            break
        sampling = SamplingParams(
            max_new_tokens=budget,
            temperature=limits.temperature,
            top_p=limits.top_p,
            stop_token_ids=chat.stop_token_ids,
            seed=turn_seed(job.seed, turn),
        )
        completion = await engine.generate(GenerateRequest(list(ctx.tokens), sampling))
        if weight_version is None:
            weight_version = completion.weight_version
        ctx.extend(completion.output_ids, 1, completion.output_logprobs)
        turns += 1
        gen_tokens += len(completion.output_ids)
        text = chat.tok.decode(completion.output_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})

        action = parser.parse(text)
        if action is None:  # a plain answer ends the episode
            terminal = True
            break
        if isinstance(action, ParseError):
            events.append(Event("parse_error", turn, {"message": action.message}))
            observation, done = f"error: {action.message}", False
        else:
            assert isinstance(action, ToolCall)
            result = await call_env(env.step(action), "step", limits.env_call_timeout_s)
            observation, done = result.observation, result.done
        if done:
            terminal = True
            break
        stopped = completion.finish_reason == "stop"
        obs_ids = chat.continuation_ids(messages, tools, observation, stopped)
        messages.append({"role": chat.observation_role, "content": observation})
        if len(ctx.tokens) + len(obs_ids) >= limits.max_context_tokens:
            events.append(Event("truncated", turn, {"reason": "context"}))
            break
        ctx.extend(obs_ids, 0)
    else:
        events.append(Event("truncated", limits.max_turns - 1, {"reason": "max_turns"}))

    score = await call_env(env.score(), "score", limits.env_call_timeout_s)
    if on_event is not None:
        for e in events:
            on_event(e)
    sub = SubTrace(
        tokens=ctx.tokens,
        loss_mask=ctx.loss_mask,
        rollout_logprobs=ctx.logprobs,
        reward=float(score.reward),
        trajectory_id=job.trajectory_id,
        segment=0,
        num_segments=1,
        terminal=terminal,
        domain=task_domain(job.task),
        weight_version=weight_version or 0,
        group_id=job.group_id,
        task_index=job.task_index,
        events=events,
    )
    metrics = {"turns": float(turns), "response_tokens": float(gen_tokens),
               "truncated": float(not terminal), **{f"env/{k}": float(v) for k, v in score.details.items()}}
    return Trajectory(job.trajectory_id, [sub], float(score.reward), metrics)


async def run_episode_with_retries(job: EpisodeJob, make_env: Callable[[], Env], engine: Engine,
                                   chat: ChatFormat, parser: Any, limits: AgentLimits,
                                   max_retries: int) -> Trajectory:
    """``run_episode`` that never raises: a dead engine or sandbox is retried up to
    ``max_retries`` times with a fresh env; an env timeout or an env bug fails the episode at
    once. A failed episode comes back as a ``Trajectory`` with ``failed=True``, its error and
    ``failure_kind`` (``engine``, ``sandbox``, ``env_timeout``, ``env_error``), so the run goes on
    and the count reaches the metrics."""
    kind = error = ""
    for _ in range(max_retries + 1):
        env = make_env()
        try:
            return await run_episode(job, env, engine, chat, parser, limits)
        except EngineError as e:
            kind, error = "engine", str(e)
        except SandboxError as e:
            kind, error = "sandbox", str(e)
        except EnvTimeout as e:
            kind, error = "env_timeout", str(e)
            break
        except Exception as e:  # a bug in a user env must not kill the worker
            kind, error = "env_error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            break
        finally:
            try:
                await call_env(env.close(), "close", limits.env_call_timeout_s)
            except Exception:
                log.exception("env.close failed")
    log.warning("episode %s failed (%s): %s", job.trajectory_id, kind, error.splitlines()[0] if error else "")
    return Trajectory(job.trajectory_id, [], 0.0, {}, failed=True, error=error, failure_kind=kind)
