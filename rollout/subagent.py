"""Sub-agent workflows (white-box): the ``spawn_subagent`` tool.

With ``subagents.enabled``, the policy gets one more tool. Calling it runs a child agent loop in
a context of its own: the sub-agent system prompt and the task the parent wrote (or the env's
own start for children, ``env.subagent_reset(task) -> Reset``, when it has one), with the env's
tools, and ``spawn_subagent`` again while ``subagents.max_depth`` allows. The child acts on the
same env (its tool calls pass the anti-hack gate like the parent's). It ends when it replies
without a tool call, and that reply is its final answer: it returns to the parent as the tool's
output (loss_mask 0 in the parent, like any observation), rendered by the env's
``render_subagent_answer(answer) -> str`` when it has one. A child that runs out of turns or
context answers with its last reply.

Each child's tokens are one sub-trace of the trajectory (``kind="subagent"``) with a parent
link: ``parent_segment`` is the sub-trace that called the tool, ``parent_position`` the index
in its tokens where the answer comes back. Children are numbered before the main chain, so the
main chain's last sub-trace (the one with the reward) stays ``num_segments - 1``.

Credit (``rl/batching.py``): the child's last action bootstraps from the parent's value at the
first action at or after ``parent_position`` (the state in which the parent reads the answer
and acts next), and the parent's advantage there carries in, so the child's advantages are
what they would be had its actions been spliced into the parent's trajectory just before that
action. The parent's own recursion does not pass through the child: from its tool call it
goes straight to its next action, as it does across any observation. The reward earned after
the answer returns thus reaches the child's tokens through the critic, and an answer that
raises the parent's value is what the child is trained to give.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from relayrl.config import SubagentConfig
from relayrl.envs.base import Env
from relayrl.types import Event, ParseError, ToolCall

from .agent import SPAWN_TOOL_NAME, AgentLimits, EpisodeJob, _Segment, _sampling, call_env, gate_call, render_dummy
from .chat import ChatFormat
from .engine import Engine, GenerateRequest


SPAWN_TOOL = {
    "type": "function",
    "function": {
        "name": SPAWN_TOOL_NAME,
        "description": "Start a sub-agent with a fresh context of its own on a task; its final answer "
                       "comes back as this tool's output.",
        "parameters": {
            "type": "object",
            "properties": {"task": {"type": "string", "description": "What the sub-agent should do, self-contained."}},
            "required": ["task"],
        },
    },
}


def child_seed(base: int | None, child: int, turn: int) -> int | None:
    if base is None:
        return None
    return zlib.crc32(f"{base}:child{child}:{turn}".encode()) & 0x7FFFFFFF


@dataclass
class ChildTrace:
    """One child's context. parent: ``("main", i)`` (the i-th sub-trace of the main chain) or
    ``("child", j)`` (the j-th child); position: where its answer returns in the parent."""

    seg: _Segment
    parent: tuple[str, int]
    position: int
    depth: int
    answer: str = ""


class SpawnerFactory:
    """Built once per rollout worker; ``for_episode`` gives each episode its own spawner."""

    def __init__(self, cfg: SubagentConfig, limits: AgentLimits, chat: ChatFormat, parser: Any) -> None:
        self.cfg = cfg
        self.limits = limits
        self.chat = chat
        if cfg.parser is not None:
            from .worker import make_parser

            parser = make_parser(cfg.parser, "subagents.parser")
        self.parser = parser

    def for_episode(self, job: EpisodeJob, env: Env, engine: Engine, gate: Any = None) -> "EpisodeSpawner":
        return EpisodeSpawner(self, job, env, engine, gate)


class EpisodeSpawner:
    """The sub-agents of one episode. ``children`` in the order they were started."""

    def __init__(self, factory: SpawnerFactory, job: EpisodeJob, env: Env, engine: Engine, gate: Any) -> None:
        self.f = factory
        self.cfg = factory.cfg
        self.job = job
        self.env = env
        self.engine = engine
        self.gate = gate
        self.children: list[ChildTrace] = []
        self.env_done = False
        self.generated_tokens = 0
        self.gate_counts = {"calls": 0.0, "flagged": 0.0, "blocked": 0.0, "judge_calls": 0.0, "judge_errors": 0.0}
        self.gate_s = [0.0]
        self.env_tools: list[dict[str, Any]] = []

    def tools(self, env_tools: list[dict[str, Any]], depth: int) -> list[dict[str, Any]]:
        """The tools an agent at ``depth`` (0 = the main agent) sees."""
        return list(env_tools) + ([SPAWN_TOOL] if depth < self.cfg.max_depth else [])

    async def spawn(self, call: ToolCall, parent: tuple[str, int], position: int, depth: int) -> str:
        """Run a child for ``call`` (made by an agent at ``depth - 1``); return its answer as the
        observation the caller reads."""
        task = call.arguments.get("task")
        if set(call.arguments) - {"task"} or not isinstance(task, str) or not task.strip():
            return f'error: {SPAWN_TOOL_NAME} takes one argument, "task", a non-empty string'
        if depth > self.cfg.max_depth:
            return f"error: sub-agents may not start sub-agents deeper than subagents.max_depth={self.cfg.max_depth}"
        if len(self.children) >= self.cfg.max_per_episode:
            return f"error: this episode has started subagents.max_per_episode={self.cfg.max_per_episode} sub-agents"
        child = ChildTrace(_Segment(), parent, position, depth)
        child.seg.kind = "subagent"
        index = len(self.children)
        self.children.append(child)
        child.answer = await self._run(child, index, task)
        render = getattr(self.env, "render_subagent_answer", None)
        return render(child.answer) if render is not None else child.answer

    async def _run(self, child: ChildTrace, index: int, task: str) -> str:
        chat, limits, cfg = self.f.chat, self.f.limits, self.cfg
        hook = getattr(self.env, "subagent_reset", None)
        if hook is not None:
            start = await call_env(hook(task), "subagent_reset", limits.env_call_timeout_s)
            messages, env_tools = list(start.messages), list(start.tools)
        else:
            messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": task}]
            env_tools = self.env_tools
        tools = self.tools(env_tools, child.depth) or None
        messages = chat.with_tool_instructions(messages, tools or [])
        seg = child.seg
        seg.ctx.extend(chat.prompt_ids(messages, tools), 0)
        max_new = cfg.max_new_tokens or limits.max_new_tokens
        max_ctx = cfg.max_context_tokens or limits.max_context_tokens
        mask = int(cfg.train_children)
        answer = ""
        task_text = task
        for turn in range(cfg.max_turns):
            budget = min(max_new, max_ctx - len(seg.ctx.tokens))
            if budget <= 0:
                seg.events.append(Event("truncated", turn, {"reason": "context"}))
                break
            completion = await self.engine.generate(GenerateRequest(
                list(seg.ctx.tokens), _sampling(limits, chat, budget, child_seed(self.job.seed, index, turn))))
            if seg.weight_version is None:
                seg.weight_version = completion.weight_version
            seg.ctx.extend(completion.output_ids, mask, completion.output_logprobs if mask else None)
            seg.turns += 1
            self.generated_tokens += len(completion.output_ids)
            answer = chat.tok.decode(completion.output_ids, skip_special_tokens=True)
            assistant = {"role": "assistant", "content": answer}
            messages.append(assistant)
            action = self.f.parser.parse(answer)
            if action is None:
                break
            if isinstance(action, ParseError):
                seg.events.append(Event("parse_error", turn, {"message": action.message}))
                observation = f"error: {action.message}"
            elif action.name == SPAWN_TOOL_NAME:
                observation = await self.spawn(action, ("child", index), len(seg.ctx.tokens), child.depth + 1)
            else:
                observation = await self._step(action, task_text, messages, seg, turn)
            if self.env_done:
                break
            obs_ids = chat.continuation_ids(messages, tools, observation, completion.finish_reason == "stop")
            if len(seg.ctx.tokens) + len(obs_ids) >= max_ctx:
                seg.events.append(Event("truncated", turn, {"reason": "context"}))
                break
            seg.ctx.extend(obs_ids, 0)
            messages.append({"role": chat.observation_role, "content": observation})
        else:
            seg.events.append(Event("truncated", cfg.max_turns - 1, {"reason": "max_turns"}))
        return answer.strip()

    async def _step(self, action: ToolCall, task: str, messages: list[dict[str, str]], seg: _Segment, turn: int) -> str:
        if self.gate is not None:
            verdict = await gate_call(self.gate, action, task, messages, self.gate_counts, self.gate_s, seg, turn)
            if verdict is not None and verdict.blocked:
                return render_dummy(self.env, action, verdict.dummy)
        result = await call_env(self.env.step(action), "step", self.f.limits.env_call_timeout_s)
        self.env_done = self.env_done or result.done
        return result.observation

    def segment_of(self, parent: tuple[str, int]) -> int:
        """The ``segment`` number of a parent once children are numbered first."""
        kind, i = parent
        return i if kind == "child" else len(self.children) + i

    def metrics(self) -> dict[str, float]:
        return {"subagents/spawned": float(len(self.children)),
                "subagents/child_turns": float(sum(c.seg.turns for c in self.children)),
                "subagents/child_tokens": float(self.generated_tokens)}
