"""A toy multi-turn environment for learning tests and the CPU quickstart.

``toy_echo``: each turn the user names a word and the agent must answer with that word through
the ``answer`` tool. An episode has ``num_turns`` turns; the reward is the fraction answered
right. A random policy over a vocabulary of V tokens scores about 1/V, a policy that learned
to copy scores 1.0, and it needs the observation of every turn (loss_mask 0) to do so: a small
but honest multi-turn credit-assignment problem that a tiny model learns in minutes on a CPU.
"""

from __future__ import annotations

import random
from typing import Any

from relayrl.registry import envs
from relayrl.types import ToolCall

from .base import Reset, Score, StepResult

ANSWER_TOOL = {
    "type": "function",
    "function": {
        "name": "answer",
        "description": "Say one word back to the user.",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "The word."}},
            "required": ["text"],
        },
    },
}


@envs.register("toy_echo")
class ToyEchoEnv:
    """Echo the word of each turn.

    Args:
        num_turns: turns per episode.
        system_prompt: the system message.
    """

    DEFAULT_SYSTEM = "repeat the word"

    def __init__(self, num_turns: int = 3, system_prompt: str | None = None) -> None:
        if num_turns < 1:
            raise ValueError("num_turns must be >= 1")
        self.num_turns = num_turns
        self.system_prompt = system_prompt or self.DEFAULT_SYSTEM
        self._targets: list[str] = []
        self._turn = 0
        self._correct = 0
        self._errors = 0

    @staticmethod
    def default_tasks(num_tasks: int = 256, seed: int = 0, words: list[str] | None = None,
                      num_turns: int = 3) -> list[dict[str, Any]]:
        """Deterministic tasks: each a list of target words, one per turn."""
        words = words or [f"w{i}" for i in range(4)]
        rng = random.Random(seed)
        return [
            {"id": f"echo-{i}", "targets": [rng.choice(words) for _ in range(num_turns)], "domain": "echo"}
            for i in range(num_tasks)
        ]

    @staticmethod
    def reference_calls(task: dict[str, Any]) -> list[ToolCall]:
        """The perfect episode: answer each turn's word."""
        return [ToolCall("answer", {"text": word}) for word in task["targets"]]

    async def reset(self, task: dict[str, Any]) -> Reset:
        targets = list(task["targets"])
        if len(targets) < self.num_turns:
            raise ValueError(f"task {task.get('id')}: needs {self.num_turns} targets, has {len(targets)}")
        self._targets = targets[: self.num_turns]
        self._turn = self._correct = self._errors = 0
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": f"say {self._targets[0]}"},
        ]
        return Reset(messages=messages, tools=[ANSWER_TOOL])

    async def step(self, call: ToolCall) -> StepResult:
        if call.name != "answer" or not isinstance(call.arguments.get("text"), str):
            self._errors += 1
            observation = "error: call the answer tool with a text argument"
        else:
            words = call.arguments["text"].split()
            if words and words[0] == self._targets[self._turn]:
                self._correct += 1
            observation = ""
        self._turn += 1
        if self._turn >= self.num_turns:
            return StepResult(observation="", done=True)
        prefix = f"{observation} " if observation else ""
        return StepResult(observation=f"{prefix}say {self._targets[self._turn]}")

    async def score(self) -> Score:
        return Score(
            reward=self._correct / self.num_turns,
            details={"correct_turns": float(self._correct), "tool_errors": float(self._errors)},
        )

    async def close(self) -> None:
        return None
