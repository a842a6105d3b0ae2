"""A toy task that needs a sub-agent: the main agent must say a word it is never shown.

``toy_delegate`` (with ``subagents.enabled``): the main agent reads "answer the word" and nothing
else; the word (one of ``w0..w3``, drawn per task) is in the start a sub-agent gets
(``subagent_reset``: "say w2"), as a retrieval tool or a file would hold it in a real task. The
main agent's one answer ends the episode: reward 1 if its first word is the secret, 0
otherwise. Without a sub-agent no policy beats chance (1/4); with one, the episode is three
learned steps: call the sub-agent (the ``DelegateParser`` reads a reply starting with ``call``
as ``spawn_subagent``), the child repeats the word it was shown (its reply is its answer,
``FinalAnswerParser``), and the parent copies the answer it reads back. The child's tokens are
credited only through the parent's value where the answer returns (``rl/batching.py``).
"""

from __future__ import annotations

import random
from typing import Any

from relayrl.registry import envs, parsers
from relayrl.types import ToolCall

from .base import Reset, Score, StepResult
from .toy import ANSWER_TOOL


@envs.register("toy_delegate")
class ToyDelegateEnv:
    """Say the secret word only a sub-agent sees.

    Args:
        system_prompt: the main agent's system message.
    """

    DEFAULT_SYSTEM = "call a tool"

    def __init__(self, system_prompt: str | None = None) -> None:
        self.system_prompt = system_prompt or self.DEFAULT_SYSTEM
        self._secret = ""
        self._correct = 0
        self._children = 0

    @staticmethod
    def default_tasks(num_tasks: int = 256, seed: int = 0, words: list[str] | None = None) -> list[dict[str, Any]]:
        words = words or [f"w{i}" for i in range(4)]
        rng = random.Random(seed)
        return [{"id": f"delegate-{i}", "secret": rng.choice(words), "domain": "delegate"} for i in range(num_tasks)]

    async def reset(self, task: dict[str, Any]) -> Reset:
        self._secret = str(task["secret"])
        self._correct = self._children = 0
        return Reset(messages=[{"role": "system", "content": self.system_prompt},
                               {"role": "user", "content": "answer the word"}], tools=[ANSWER_TOOL])

    async def subagent_reset(self, task: str) -> Reset:
        """A sub-agent's start: it is shown the word (and has no tools: its reply is its answer)."""
        self._children += 1
        return Reset(messages=[{"role": "system", "content": "repeat the word"},
                               {"role": "user", "content": f"say {self._secret}"}], tools=[])

    async def step(self, call: ToolCall) -> StepResult:
        words = str(call.arguments.get("text", "")).split() if call.name == "answer" else []
        self._correct = int(bool(words) and words[0] == self._secret)
        return StepResult(observation="", done=True)

    async def score(self) -> Score:
        return Score(reward=float(self._correct), details={"correct": float(self._correct),
                                                            "children": float(self._children)})

    async def close(self) -> None:
        return None


@parsers.register("toy_delegate")
class DelegateParser:
    """A reply whose first word is ``call`` starts a sub-agent (the rest is its task); any
    other reply is the ``answer`` tool's text."""

    def parse(self, text: str) -> ToolCall:
        words = text.split()
        if words and words[0] == "call":
            return ToolCall("spawn_subagent", {"task": " ".join(words[1:]) or "the word"}, raw=text)
        return ToolCall("answer", {"text": text.strip()}, raw=text)

    def format_tools(self, tools: list[dict]) -> str:
        return ""


@parsers.register("final_answer")
class FinalAnswerParser:
    """Every reply is a final answer (no tool calls): for sub-agents without tools."""

    def parse(self, text: str) -> None:
        return None

    def format_tools(self, tools: list[dict]) -> str:
        return ""
