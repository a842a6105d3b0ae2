"""The white-box agent loop: one episode from ``env.reset`` to ``env.score``.

Per turn: generate from the exact token context, parse the tool call, step the env, append the
observation with loss_mask 0, until the env says done, the agent answers without a tool call,
or a cap (turns, context tokens, segments) cuts the episode. A cap is truncation, not
termination: the last sub-trace is marked ``terminal=False``.

A reply the parser cannot read is a format error: an ``error: ...`` observation, a
``parse_error`` event, and the episode goes on. So is a reply without any tool call in an env
that declares ``requires_action`` (its final answer is a tool, like the coding env's
``submit``); the parser words the error (``no_action_message``). Their count per episode is the
``format_errors`` metric.

With a ``Compactor`` (``rollout/compaction.py``), a turn whose context would grow past the
compactor's limit ends its sub-trace instead: the observation and a summary request are
appended, the policy writes the summary (the sub-trace's last action), and the episode goes on
in a fresh context rebuilt from the start messages, the summary and the last turns, as the next
sub-trace of the same trajectory. Only the last sub-trace carries the reward; GAE carries it
back across the cuts.

With a ``Gate`` (``antihack/gate.py``), every tool call is checked before it runs: a blocked
call never reaches the env, the agent reads the rule's dummy output instead (shaped by the
env's ``render_dummy`` when it has one) and the episode goes on. Each verdict on a flagged
call is an ``antihack`` event of the sub-trace.

With a ``SpawnerFactory`` (``rollout/subagent.py``), the policy also has ``spawn_subagent``: a
child loop runs in a context of its own and its answer is the tool's observation; each child is
a sub-trace (numbered before the main chain) with a parent link. In black-box mode the worker
passes ``run_episode_with_retries`` another ``runner`` (``rollout/blackbox.py``) instead.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from relayrl.envs.base import Env, requires_action, task_domain
from relayrl.envs.sandbox import SandboxError
from relayrl.types import Event, ParseError, SubTrace, ToolCall, Trajectory

from .chat import ChatFormat
from .compaction import Compactor
from .engine import Engine, EngineError, GenerateRequest, SamplingParams
from .parsers import no_action_message

SPAWN_TOOL_NAME = "spawn_subagent"  # rollout/subagent.py owns the tool; the name is all the loop needs

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


@dataclass
class _Segment:
    """One context window of the episode: becomes one sub-trace."""

    ctx: _Context = field(default_factory=_Context)
    events: list[Event] = field(default_factory=list)
    weight_version: int | None = None
    turns: int = 0
    kind: str = "turns"


def _sampling(limits: AgentLimits, chat: ChatFormat, budget: int, seed: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=budget, temperature=limits.temperature, top_p=limits.top_p,
                          stop_token_ids=chat.stop_token_ids, seed=seed)


async def run_episode(
    job: EpisodeJob,
    env: Env,
    engine: Engine,
    chat: ChatFormat,
    parser: Any,
    limits: AgentLimits,
    compactor: Compactor | None = None,
    on_event: Callable[[Event], None] | None = None,
    gate: Any = None,
    spawner: Any = None,
) -> Trajectory:
    """Run one episode to its end and return its trajectory: one sub-trace per context window
    (more than one when ``compactor`` compacts, or when ``spawner``, a
    ``rollout.subagent.SpawnerFactory``, runs sub-agents: each child is a sub-trace too)."""
    started = asyncio.get_running_loop().time()
    reset = await call_env(env.reset(job.task), "reset", limits.env_call_timeout_s)
    kids = None
    if spawner is not None:
        kids = spawner.for_episode(job, env, engine, gate)
        kids.env_tools = list(reset.tools)
        reset.tools = kids.tools(reset.tools, 0)
    tools = reset.tools or None
    start = chat.with_tool_instructions(list(reset.messages), reset.tools)
    messages = list(start)
    history: list[list[dict[str, str]]] = []  # [assistant, observation] per turn, for rebuilds
    seg = _Segment()
    seg.ctx.extend(chat.prompt_ids(messages, tools), 0)
    segments = [seg]
    terminal = False
    gen_tokens = 0
    task_text = next((m["content"] for m in start if m.get("role") == "user"), None)
    gate_counts = {"calls": 0.0, "flagged": 0.0, "blocked": 0.0, "judge_calls": 0.0, "judge_errors": 0.0}
    gate_s = [0.0]
    action_required = requires_action(env)
    format_errors = 0

    for turn in range(limits.max_turns):
        budget = min(limits.max_new_tokens, limits.max_context_tokens - len(seg.ctx.tokens))
        if budget <= 0:
            seg.events.append(Event("truncated", turn, {"reason": "context"}))
            break
        completion = await engine.generate(GenerateRequest(
            list(seg.ctx.tokens), _sampling(limits, chat, budget, turn_seed(job.seed, turn))))
        if seg.weight_version is None:
            seg.weight_version = completion.weight_version
        seg.ctx.extend(completion.output_ids, 1, completion.output_logprobs)
        seg.turns += 1
        gen_tokens += len(completion.output_ids)
        text = chat.tok.decode(completion.output_ids, skip_special_tokens=True)
        assistant = {"role": "assistant", "content": text}
        messages.append(assistant)

        action = parser.parse(text)
        if action is None and not action_required:  # a plain answer ends the episode
            terminal = True
            break
        if action is None or isinstance(action, ParseError):
            message = no_action_message(parser) if action is None else action.message
            seg.events.append(Event("parse_error", turn, {"message": message, "no_action": action is None}))
            format_errors += 1
            observation, done = f"error: {message}", False
        else:
            assert isinstance(action, ToolCall)
            verdict = None
            if kids is not None and action.name == SPAWN_TOOL_NAME:  # a child runs; its answer returns
                observation = await kids.spawn(action, ("main", len(segments) - 1), len(seg.ctx.tokens), 1)
                done = kids.env_done
            else:
                if gate is not None:
                    verdict = await gate_call(gate, action, task_text, messages, gate_counts, gate_s, seg, turn)
                if verdict is not None and verdict.blocked:
                    observation, done = render_dummy(env, action, verdict.dummy), False
                else:
                    result = await call_env(env.step(action), "step", limits.env_call_timeout_s)
                    observation, done = result.observation, result.done
        if done:
            terminal = True
            break
        stopped = completion.finish_reason == "stop"
        obs_msg = {"role": chat.observation_role, "content": observation}
        obs_ids = chat.continuation_ids(messages, tools, [obs_msg], stopped)
        history.append([assistant, obs_msg])
        if compactor is not None and compactor.should_compact(len(seg.ctx.tokens) + len(obs_ids), seg.turns,
                                                              limits.max_new_tokens):
            if len(segments) >= compactor.max_segments:
                seg.events.append(Event("truncated", turn, {"reason": "max_segments"}))
                break
            request = {"role": "user", "content": compactor.request()}
            ids = chat.continuation_ids(messages, tools, [obs_msg, request], stopped)
            summary_budget = min(compactor.summary_max_tokens, limits.max_context_tokens - len(seg.ctx.tokens) - len(ids))
            if summary_budget <= 0:
                seg.events.append(Event("truncated", turn, {"reason": "context"}))
                break
            seg.ctx.extend(ids, 0)
            summary = await engine.generate(GenerateRequest(
                list(seg.ctx.tokens), _sampling(limits, chat, summary_budget, summary_seed(job.seed, len(segments)))))
            seg.ctx.extend(summary.output_ids, int(compactor.train_summary),
                           summary.output_logprobs if compactor.train_summary else None)
            gen_tokens += len(summary.output_ids)
            summary_text = chat.tok.decode(summary.output_ids, skip_special_tokens=True)
            messages = compactor.rebuild(start, history, summary_text)
            seg.events.append(Event("compaction", turn, {
                "segment": len(segments) - 1, "context_tokens": len(seg.ctx.tokens),
                "summary_tokens": len(summary.output_ids)}))
            seg = _Segment(kind="compaction")
            seg.ctx.extend(chat.prompt_ids(messages, tools), 0)
            segments.append(seg)
            continue
        messages.append(obs_msg)
        if len(seg.ctx.tokens) + len(obs_ids) >= limits.max_context_tokens:
            seg.events.append(Event("truncated", turn, {"reason": "context"}))
            break
        seg.ctx.extend(obs_ids, 0)
    else:
        seg.events.append(Event("truncated", limits.max_turns - 1, {"reason": "max_turns"}))

    score = await call_env(env.score(), "score", limits.env_call_timeout_s)
    if on_event is not None:
        for e in (e for sg in [ch.seg for ch in (kids.children if kids else [])] + segments for e in sg.events):
            on_event(e)
    children = kids.children if kids is not None else []
    c = len(children)
    n = c + len(segments)
    subs = [
        SubTrace(
            tokens=ch.seg.ctx.tokens,
            loss_mask=ch.seg.ctx.loss_mask,
            rollout_logprobs=ch.seg.ctx.logprobs,
            reward=0.0,
            trajectory_id=job.trajectory_id,
            segment=i,
            num_segments=n,
            terminal=False,
            domain=task_domain(job.task),
            weight_version=ch.seg.weight_version or 0,
            group_id=job.group_id,
            task_index=job.task_index,
            events=ch.seg.events,
            kind="subagent",
            parent_segment=kids.segment_of(ch.parent),
            parent_position=ch.position,
        )
        for i, ch in enumerate(children)
    ] + [
        SubTrace(
            tokens=sg.ctx.tokens,
            loss_mask=sg.ctx.loss_mask,
            rollout_logprobs=sg.ctx.logprobs,
            reward=float(score.reward) if c + i == n - 1 else 0.0,
            trajectory_id=job.trajectory_id,
            segment=c + i,
            num_segments=n,
            terminal=terminal and c + i == n - 1,
            domain=task_domain(job.task),
            weight_version=sg.weight_version or 0,
            group_id=job.group_id,
            task_index=job.task_index,
            events=sg.events,
            kind=sg.kind,
        )
        for i, sg in enumerate(segments)
    ]
    kinds = [s.kind for s in subs]
    metrics = {"turns": float(sum(sg.turns for sg in segments)), "response_tokens": float(gen_tokens),
               "segments": float(len(segments)), "truncated": float(not terminal),
               "format_errors": float(format_errors),
               **{f"subtraces/{k}": float(kinds.count(k)) for k in ("turns", "compaction", "subagent")},
               **(kids.metrics() if kids is not None else {}),
               # time/ metrics vary run to run; they are averaged as they are, not as rollout/
               "time/episode_s": asyncio.get_running_loop().time() - started,
               **({f"antihack_{k}": v for k, v in gate_counts.items()} | {"time/antihack_gate_s": gate_s[0]}
                  if gate is not None else {}),
               **{f"env/{k}": float(v) for k, v in score.details.items()}}
    return Trajectory(job.trajectory_id, subs, float(score.reward), metrics)


async def gate_call(gate: Any, action: ToolCall, task: str | None, messages: list[dict[str, str]],
                    counts: dict[str, float], seconds: list[float], seg: "_Segment", turn: int) -> Any:
    """Run the gate on ``action``; record the verdict of a flagged call as an event."""
    start = asyncio.get_running_loop().time()
    verdict = await gate.check(action.name, action.arguments, task=task,
                               context=messages[-gate.context_messages:] if gate.context_messages else [])
    seconds[0] += asyncio.get_running_loop().time() - start
    counts["calls"] += 1
    if verdict.flagged:
        counts["flagged"] += 1
        counts["blocked"] += float(verdict.blocked)
        counts["judge_calls"] += float(verdict.stage == "judge" and not verdict.cached or verdict.judge_error is not None)
        counts["judge_errors"] += float(verdict.judge_error is not None)
        data = verdict.to_json()
        data["call"] = {"name": action.name, "arguments": _clip_args(action.arguments)}
        seg.events.append(Event("antihack", turn, data))
    return verdict


def _clip_args(arguments: dict[str, Any], limit: int = 2000) -> dict[str, Any]:
    return {k: (v[:limit] + "...[clipped]" if isinstance(v, str) and len(v) > limit else v) for k, v in arguments.items()}


def render_dummy(env: Env, call: ToolCall, dummy: Any) -> str:
    """The observation a blocked call returns: the env's own rendering when it has one."""
    render = getattr(env, "render_dummy", None)
    if render is not None:
        return render(call, dummy)
    return dummy.render()


def summary_seed(base: int | None, segment: int) -> int | None:
    if base is None:
        return None
    return zlib.crc32(f"{base}:summary:{segment}".encode()) & 0x7FFFFFFF


async def run_episode_with_retries(job: EpisodeJob, make_env: Callable[[], Env], engine: Engine,
                                   chat: ChatFormat, parser: Any, limits: AgentLimits,
                                   max_retries: int, compactor: Compactor | None = None,
                                   gate: Any = None,
                                   runner: Callable[[EpisodeJob, Env], Awaitable[Trajectory]] | None = None,
                                   spawner: Any = None) -> Trajectory:
    """``run_episode`` that never raises: a dead engine or sandbox is retried up to
    ``max_retries`` times with a fresh env; an env timeout or an env bug fails the episode at
    once. A failed episode comes back as a ``Trajectory`` with ``failed=True``, its error and
    ``failure_kind`` (``engine``, ``sandbox``, ``env_timeout``, ``env_error``), so the run goes on
    and the count reaches the metrics.

    runner: the episode itself, ``runner(job, env)``; None = the white-box ``run_episode`` (the
    worker passes the black-box runner, ``rollout/blackbox.py``, when ``blackbox.enabled``)."""
    kind = error = ""
    for _ in range(max_retries + 1):
        env = make_env()
        try:
            if runner is not None:
                return await runner(job, env)
            return await run_episode(job, env, engine, chat, parser, limits, compactor, gate=gate, spawner=spawner)
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
