"""Grade a coding task through the real env: reset, the given tool calls, score."""

from __future__ import annotations

from relayrl.envs.coding import CodingEnv
from relayrl.types import ToolCall


async def score_calls(task: dict, calls: list[ToolCall]) -> tuple[float, float]:
    """(reward, hidden tests run) of an episode that makes ``calls`` (until one ends it)."""
    env = CodingEnv(sandbox={"timeout_s": 60})
    try:
        await env.reset(task)
        for call in calls:
            if (await env.step(call)).done:
                break
        score = await env.score()
        return score.reward, score.details["hidden_total"]
    finally:
        await env.close()
