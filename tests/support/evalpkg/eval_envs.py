"""Envs for the ``relayrl eval`` tests: the score is known in advance, whatever the model says.

``FixedRewardEnv``: one turn, any reply ends the episode (the ``plain`` parser's ``answer``
tool); the reward is the task's ``reward`` field. A task with ``broken: true`` fails in
``reset`` the way a dead sandbox does (``SandboxError``), so the episode cannot run.
"""

from __future__ import annotations

from typing import Any

from relayrl.envs.base import Reset, Score, StepResult
from relayrl.envs.sandbox import SandboxError
from relayrl.types import ToolCall


class FixedRewardEnv:
    def __init__(self) -> None:
        self._task: dict[str, Any] = {}

    @staticmethod
    def check_task(task: dict[str, Any]) -> None:
        if not isinstance(task.get("reward"), (int, float)):
            raise ValueError("a task needs a numeric 'reward'")

    async def reset(self, task: dict[str, Any]) -> Reset:
        if task.get("broken"):
            raise SandboxError("the sandbox could not start (test)")
        self._task = task
        return Reset(messages=[{"role": "system", "content": "say"}, {"role": "user", "content": "say w0"}])

    async def step(self, call: ToolCall) -> StepResult:
        return StepResult(observation="", done=True)

    async def score(self) -> Score:
        return Score(reward=float(self._task["reward"]), details={"tool_calls": 1.0})

    async def close(self) -> None:
        return None
