"""``prompts``: a one-turn environment over prompts that carry a ``domain``, for distillation.

A task is ``{"id", "prompt", "domain"}`` and optionally ``"system"`` and ``"answer"``. The agent
replies once (any reply ends the episode; use ``rollout.parser: plain``). The reward is 1 when the
reply's first word is the task's ``answer`` and 0 otherwise (0 when there is none): distillation
does not need it, but ``distill.add_task_advantage`` and ``relayrl eval`` can use it.

Name it in YAML as ``env.name: relayrl.opd.env:PromptEnv`` (or ``prompts`` once
``relayrl.opd.env`` is imported), with ``env.tasks`` a jsonl/parquet file of such tasks.
"""

from __future__ import annotations

from typing import Any

from relayrl.envs.base import Reset, Score, StepResult
from relayrl.registry import envs
from relayrl.types import ToolCall


@envs.register("prompts")
class PromptEnv:
    """One prompt, one reply. system_prompt: used for tasks without their own ``system``."""

    def __init__(self, system_prompt: str | None = None) -> None:
        self.system_prompt = system_prompt
        self._answer: str | None = None
        self._correct = 0.0

    @staticmethod
    def check_task(task: dict[str, Any]) -> None:
        if not isinstance(task.get("prompt"), str) or not task["prompt"]:
            raise ValueError("a prompts task needs a non-empty string 'prompt'")
        if not isinstance(task.get("domain"), str):
            raise ValueError("a prompts task needs a string 'domain' (it routes the task to its teacher)")

    @staticmethod
    def reference_calls(task: dict[str, Any]) -> list[ToolCall]:
        return [ToolCall("answer", {"text": str(task.get("answer", ""))})]

    async def reset(self, task: dict[str, Any]) -> Reset:
        self.check_task(task)
        self._answer = task.get("answer")
        self._correct = 0.0
        messages = []
        system = task.get("system") or self.system_prompt
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": task["prompt"]})
        return Reset(messages=messages)

    async def step(self, call: ToolCall) -> StepResult:
        text = call.arguments.get("text")
        words = text.split() if isinstance(text, str) else []
        self._correct = float(self._answer is not None and bool(words) and words[0] == self._answer)
        return StepResult(observation="", done=True)

    async def score(self) -> Score:
        return Score(reward=self._correct, details={"correct": self._correct})

    async def close(self) -> None:
        return None
