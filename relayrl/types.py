"""The types that cross a boundary between relayrl's parts.

Mask polarity is the same everywhere: ``1`` means "this token counts" (it was sampled by the
policy and is trained on); ``0`` is prompt, tool output, dummy output or scaffolding. There are
no sentinel values in padded positions: padding is always described by a mask.

These are plain dataclasses of Python scalars and lists so that they pickle cheaply through
Ray's object store and serialise to JSON for the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One tool call parsed from the model's text.

    name: the tool's name as the model wrote it (may be unknown to the env).
    arguments: the decoded JSON arguments.
    raw: the exact text the call was parsed from, kept for the anti-hack gate and audit logs.
    """

    name: str
    arguments: dict[str, Any]
    raw: str = ""


@dataclass(frozen=True)
class ParseError:
    """Text that was meant to be a tool call but did not parse; becomes an error observation."""

    message: str
    raw: str = ""


@dataclass
class Event:
    """Something that happened during an episode, attached to the sub-trace it happened in.

    kind: "tool_error", "parse_error", "antihack", "compaction", "truncated", "engine_error", ...
    turn: the agent turn (0-based) within the trajectory.
    data: JSON-serialisable details.
    """

    kind: str
    turn: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubTrace:
    """The unit of training: one context window of one trajectory.

    All per-token lists have the same length ``len(tokens)``.

    tokens: prompt + response token ids, in order.
    loss_mask: 1 = sampled by the policy and trained on; 0 = prompt, observation, scaffolding.
    rollout_logprobs: log-probability the engine assigned to each token when it sampled it
        (0.0 where loss_mask is 0; those positions are never read).
    reward: the task reward, on the last sub-trace of a trajectory; 0.0 on the others.
    trajectory_id: unique id of the episode this sub-trace belongs to.
    segment, num_segments: position of this sub-trace within its trajectory.
    terminal: the episode ended by the task (done), not by a compaction cut or a cap. A
        sub-trace before a cut is never terminal and GAE continues across the cut; the last
        sub-trace is scored by the env either way and does not bootstrap unless
        ``algorithm.bootstrap_truncated`` says so (rl/batching.py).
    domain: routes on-policy distillation teachers; "" when unused.
    weight_version: the policy version that sampled the first response token of this sub-trace.
    group_id: episodes started from the same task share it (group-relative estimators).
    task_index: the position of the task in the run's data order (for resume and ordering).
    events: anti-hack verdicts, parse errors, caps, ...
    kind: how this context window began: ``turns`` (the episode's first context in the white-box
        loop), ``compaction`` (the context after a compaction cut), ``subagent`` (a child agent's
        own context, ``rollout/subagent.py``), ``blackbox`` (calls recorded by the black-box
        proxy, ``rollout/proxy.py``).
    parent_segment: for a child trace (a sub-agent's), the ``segment`` of the sub-trace whose
        tool call started it; -1 for the main chain. Child traces are numbered before the main
        chain, so the main chain's last sub-trace is still ``num_segments - 1``.
    parent_position: for a child trace, the index in the parent's ``tokens`` where the child's
        result returns (the first token of the observation that carries it); -1 otherwise.
        GAE continues from the child's last action to the parent's first action at or after it
        (``rl/batching.py``).
    """

    tokens: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    reward: float
    trajectory_id: str
    segment: int = 0
    num_segments: int = 1
    terminal: bool = True
    domain: str = ""
    weight_version: int = 0
    group_id: str = ""
    task_index: int = 0
    events: list[Event] = field(default_factory=list)
    kind: str = "turns"
    parent_segment: int = -1
    parent_position: int = -1

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.loss_mask) != n or len(self.rollout_logprobs) != n:
            raise ValueError(
                f"SubTrace {self.trajectory_id}/{self.segment}: tokens ({n}), loss_mask "
                f"({len(self.loss_mask)}) and rollout_logprobs ({len(self.rollout_logprobs)}) "
                "must have the same length"
            )

    @property
    def num_response_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SubTrace":
        d = dict(d)
        d["events"] = [Event(**e) for e in d.get("events", [])]
        return cls(**d)


@dataclass
class Trajectory:
    """All sub-traces of one episode, its reward and the env's metrics.

    reward: the task reward (also stored on the last sub-trace).
    metrics: flat name -> number details from ``env.score()`` and the agent loop.
    failed: the episode could not complete (engine or sandbox died, a black-box agent exited
        before its first call); it is logged, never trained.
    failure_kind: why, when failed: ``engine``, ``sandbox``, ``env_timeout``, ``env_error`` or
        ``agent`` (black-box mode, ``rollout/blackbox.py``).
    """

    trajectory_id: str
    sub_traces: list[SubTrace]
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    error: str = ""
    failure_kind: str = ""

    @property
    def num_turns(self) -> int:
        return int(self.metrics.get("turns", 0))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        d["sub_traces"] = [SubTrace.from_json(s) for s in d["sub_traces"]]
        return cls(**d)
