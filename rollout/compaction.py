"""Compaction: how a long episode goes on past its context window.

When the next turn would not fit (or a segment has used its turns), the agent loop asks the
``Compactor`` for a request message, lets the policy write a summary of its progress, and starts
a new context from the compactor's ``rebuild``: the episode's start (system + task), the
summary, and the last few turns verbatim. The tokens before the cut become one sub-trace, the
tokens after it the next, of the same trajectory; GAE runs across the cut (``rl/batching.py``).

The default ``PolicyCompactor`` makes the summary a trained action (``train_summary``): the
reward earned after the cut reaches the summary through the critic's bootstrap, so the policy
learns to write summaries that let it finish. A user's compactor is a class named in
``compaction.compactor`` (``pkg.mod:Class``), constructed with the ``compaction`` config section.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from relayrl.config import CompactionConfig
from relayrl.registry import Registry

compactors: Registry["Compactor"] = Registry("compactor")


@runtime_checkable
class Compactor(Protocol):
    summary_max_tokens: int
    train_summary: bool
    max_segments: int

    def should_compact(self, context_tokens: int, segment_turns: int, next_turn_tokens: int) -> bool:
        """Whether to compact before the next turn of a segment that has ``segment_turns`` turns
        and ``context_tokens`` tokens, when a turn may add ``next_turn_tokens``."""
        ...

    def request(self) -> str:
        """The user message that asks the policy for its summary."""
        ...

    def rebuild(self, start: list[dict[str, str]], turns: list[list[dict[str, str]]],
                summary: str) -> list[dict[str, str]]:
        """The new context's messages.

        start: the episode's first messages (system + task). turns: every turn since, each
        ``[assistant message, observation message]`` (the last one's observation not answered
        yet). summary: the policy's summary text.
        """
        ...


@compactors.register("policy")
class PolicyCompactor:
    """The policy summarises itself; the new context is start + summary + the last k turns."""

    SUMMARY_PREFIX = "Summary of your progress so far (your earlier context was compacted):\n"

    def __init__(self, cfg: CompactionConfig) -> None:
        self.max_context_tokens = cfg.max_context_tokens
        self.max_turns_per_segment = cfg.max_turns_per_segment
        self.prompt = cfg.prompt
        self.keep_last_turns = cfg.keep_last_turns
        self.summary_max_tokens = cfg.summary_max_tokens
        self.train_summary = cfg.train_summary
        self.max_segments = cfg.max_segments

    def should_compact(self, context_tokens: int, segment_turns: int, next_turn_tokens: int) -> bool:
        if segment_turns == 0:  # a fresh context is never compacted again: it would loop
            return False
        if self.max_turns_per_segment is not None and segment_turns >= self.max_turns_per_segment:
            return True
        return context_tokens + next_turn_tokens > self.max_context_tokens

    def request(self) -> str:
        return self.prompt

    def rebuild(self, start: list[dict[str, str]], turns: list[list[dict[str, str]]],
                summary: str) -> list[dict[str, str]]:
        kept = turns[len(turns) - self.keep_last_turns:] if self.keep_last_turns else []
        messages = [dict(m) for m in start]
        messages.append({"role": "user", "content": self.SUMMARY_PREFIX + summary.strip()})
        for turn in kept:
            messages.extend(dict(m) for m in turn)
        return messages


def make_compactor(cfg: CompactionConfig) -> Compactor | None:
    """The configured compactor, or None when compaction is off (checked at start-up)."""
    if not cfg.enabled:
        return None
    return compactors.resolve(cfg.compactor, "compaction.compactor")(cfg)
