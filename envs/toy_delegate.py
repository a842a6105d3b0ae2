"""A toy task that needs a sub-agent: some of the words the main agent must say it is never shown.

``toy_delegate`` (with ``subagents.enabled``) is ``toy_echo`` with hidden turns. Each of
``num_turns`` turns the main agent must answer one word (``w0..w3``): on a *direct* turn it is
shown "say w2", as in ``toy_echo``; on a *hidden* turn (about half) it is told only to call a
sub-agent ("say call"), and the word is in the start a sub-agent gets (``subagent_reset``: "say
w2"), as a retrieval tool or a file would hold it in a real task. The reward is the fraction of
turns answered right (first word); a hidden turn counts only if a sub-agent was called on it
(the word cannot be known otherwise, so a lucky guess is not credited).

A hidden turn takes three steps, each the skill the direct turns teach ("repeat the word you
are shown"): the parent follows "say call" (``DelegateParser`` reads a reply whose first word
is ``call`` as ``spawn_subagent``), the child, shown "say w2", repeats "w2" (its reply is its
answer, ``FinalAnswerParser``), and the answer comes back as "say w2"
(``render_subagent_answer``) for the parent to repeat. All three must be right for the turn to
score, and the child's tokens get their credit only through the parent's value where its answer
returns (``rl/batching.py``). The task tells the agent to delegate rather than leaving it to be
discovered: a tiny model's random replies rarely delegate, and one that has learned to answer
never does, so RL alone would not find it (seen: 30 steps with an untold hidden turn stayed at
chance). ``score`` reports ``hidden_turns``, ``hidden_correct`` and ``hidden_delegated`` so the
hidden turns can be read apart.

Three choices make it learnable by a tiny model in a few minutes, each found by a run that was
not (``tests/test_subagent_e2e.py`` has the numbers): only the word a hidden turn says
delegates (with four common words, a random policy delegated one reply in six and the parent's
replies were mostly noise); a guess on a hidden turn scores nothing (else "always say w0" is
right on a quarter of all turns and beats a three-step chain that pays only once learned); and
a sub-agent starts under its own system prompt (``subagent_system_prompt``). Without that its
context is exactly a parent's on a direct turn, where "call" is also a fine reply (the child is
shown the same word): one policy is then asked for "call" and for "w2" in one context, the
children learn "call" too, and every call returns "say call ..." and calls again.
"""

from __future__ import annotations

import random
from typing import Any

from relayrl.registry import envs, parsers
from relayrl.types import ToolCall

from .base import Reset, Score, StepResult
from .toy import ANSWER_TOOL

HIDDEN_PROMPT = "say call"


@envs.register("toy_delegate")
class ToyDelegateEnv:
    """Say each turn's word; on hidden turns only a sub-agent is shown it.

    Args:
        num_turns: turns per episode.
        system_prompt: the main agent's system message.
        num_words: the words ``w0..`` the default tasks draw from (when the tasks come from
            ``default_tasks``, which takes the same env.kwargs).
        hidden_fraction: likewise, the probability that a turn is hidden.
        subagent_system_prompt: a sub-agent's system message (its words must differ from
            ``system_prompt``'s, see the module docstring).
    """

    DEFAULT_SYSTEM = "repeat the word"
    DEFAULT_SUBAGENT_SYSTEM = "answer with the word"

    def __init__(self, num_turns: int = 3, system_prompt: str | None = None, num_words: int = 4,
                 hidden_fraction: float = 0.5, subagent_system_prompt: str | None = None) -> None:
        if num_turns < 1:
            raise ValueError("num_turns must be >= 1")
        if num_words < 1 or not 0.0 <= hidden_fraction <= 1.0:
            raise ValueError("num_words must be >= 1 and hidden_fraction in [0, 1]")
        self.num_turns = num_turns
        self.system_prompt = system_prompt or self.DEFAULT_SYSTEM
        self.subagent_system_prompt = subagent_system_prompt or self.DEFAULT_SUBAGENT_SYSTEM
        self._targets: list[str] = []
        self._hidden: list[bool] = []
        self._delegated: list[bool] = []
        self._turn = self._correct = self._hidden_correct = 0

    @staticmethod
    def default_tasks(num_tasks: int = 256, seed: int = 0, words: list[str] | None = None,
                      num_turns: int = 3, num_words: int = 4, hidden_fraction: float = 0.5) -> list[dict[str, Any]]:
        """Targets drawn from ``words`` (default ``w0..w{num_words-1}``); each turn hidden with
        probability ``hidden_fraction``."""
        words = words or [f"w{i}" for i in range(num_words)]
        rng = random.Random(seed)
        return [{"id": f"delegate-{i}", "targets": [rng.choice(words) for _ in range(num_turns)],
                 "hidden": [rng.random() < hidden_fraction for _ in range(num_turns)], "domain": "delegate"}
                for i in range(num_tasks)]

    def _prompt(self) -> str:
        return HIDDEN_PROMPT if self._hidden[self._turn] else f"say {self._targets[self._turn]}"

    async def reset(self, task: dict[str, Any]) -> Reset:
        if len(task["targets"]) < self.num_turns or len(task["hidden"]) < self.num_turns:
            raise ValueError(f"task {task.get('id')}: needs {self.num_turns} targets and hidden flags")
        self._targets = list(task["targets"][: self.num_turns])
        self._hidden = [bool(h) for h in task["hidden"][: self.num_turns]]
        self._delegated = [False] * self.num_turns
        self._turn = self._correct = self._hidden_correct = 0
        return Reset(messages=[{"role": "system", "content": self.system_prompt},
                               {"role": "user", "content": self._prompt()}], tools=[ANSWER_TOOL])

    async def subagent_reset(self, task: str) -> Reset:
        """A sub-agent's start: it is shown this turn's word (and has no tools: its reply is its
        answer)."""
        self._delegated[self._turn] = True
        return Reset(messages=[{"role": "system", "content": self.subagent_system_prompt},
                               {"role": "user", "content": f"say {self._targets[self._turn]}"}], tools=[])

    def render_subagent_answer(self, answer: str) -> str:
        """The child's answer as the parent reads it: in the words of a direct turn."""
        return f"say {answer}"

    async def step(self, call: ToolCall) -> StepResult:
        words = str(call.arguments.get("text", "")).split() if call.name == "answer" else []
        right = bool(words) and words[0] == self._targets[self._turn]
        # A hidden turn's word can only be known from a sub-agent: a guess is not credited.
        if right and (self._delegated[self._turn] or not self._hidden[self._turn]):
            self._correct += 1
            self._hidden_correct += self._hidden[self._turn]
        self._turn += 1
        if self._turn >= self.num_turns:
            return StepResult(observation="", done=True)
        return StepResult(observation=self._prompt())

    async def score(self) -> Score:
        return Score(reward=self._correct / self.num_turns, details={
            "correct_turns": float(self._correct), "hidden_turns": float(sum(self._hidden)),
            "hidden_correct": float(self._hidden_correct),
            "hidden_delegated": float(sum(d and h for d, h in zip(self._delegated, self._hidden, strict=True)))})

    async def close(self) -> None:
        return None


DELEGATE_WORD = "call"


@parsers.register("toy_delegate")
class DelegateParser:
    """A reply whose first word is ``call`` starts a sub-agent (the reply is its task); any
    other reply is the ``answer`` tool's text. One word of a tiny model's vocabulary of about
    twenty, the word a hidden turn says: following "say call" is how to delegate, and a random
    policy delegates about one reply in twenty."""

    def parse(self, text: str) -> ToolCall:
        words = text.split()
        if words and words[0] == DELEGATE_WORD:
            return ToolCall("spawn_subagent", {"task": text.strip()}, raw=text)
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
