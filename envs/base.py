"""The ``Env`` seam: an episode's world, as the agent loop sees it.

An environment is constructed once per episode (``cls(**env.kwargs)``) inside a rollout
worker, then driven by the agent loop::

    first = await env.reset(task)          # messages to start from + tool schemas
    while not done:
        result = await env.step(tool_call)  # observation text, done
    score = await env.score()              # reward + details, after the episode
    await env.close()

All methods are async so environments can talk to remote sandboxes without blocking the
worker's other episodes. A user's environment is a class in their own package, named in YAML as
``env.name: my_pkg.my_env:MyEnv``.

Optional class attribute ``requires_action: bool`` (read by ``requires_action(env)``; default
False): True says the env has its own final-answer tool (the coding env's ``submit``), so a
reply without a tool call is a format error the agent is told about, not the end of the
episode. With False, such a reply is the agent's final answer and ends the episode. It is not a
member of the ``Env`` protocol, so envs written without it still pass ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from relayrl.types import ToolCall


@dataclass
class Reset:
    """messages: chat messages to start from (system, user). tools: JSON schemas of the tools."""

    messages: list[dict[str, str]]
    tools: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepResult:
    observation: str
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    """reward: the task reward. details: flat metrics (numbers) logged per step."""

    reward: float
    details: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    async def reset(self, task: dict[str, Any]) -> Reset: ...

    async def step(self, call: ToolCall) -> StepResult: ...

    async def score(self) -> Score: ...

    async def close(self) -> None: ...


def requires_action(env: Any) -> bool:
    """Whether every reply must be a tool call in ``env`` (its ``requires_action``, default False)."""
    return bool(getattr(env, "requires_action", False))


def task_domain(task: dict[str, Any]) -> str:
    return str(task.get("domain", ""))
