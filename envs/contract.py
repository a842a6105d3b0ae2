"""Contract checks any ``Env`` (and any ``SandboxProvider``) can be run through.

``relayrl envs check NAME_OR_PATH`` runs them on a user's environment before a job ever
starts; the test suite runs them on the built-in env, the example env and the remote sandbox
client. Each check is one property, reported as passed or failed with the reason; nothing here
stops at the first failure, so a user sees everything that is wrong at once.

Env checks: tasks pass the env's ``check_task``; ``reset`` returns chat messages and valid tool
schemas; hostile tool calls (unknown tool, missing, extra and mistyped arguments, a 1 MiB
argument, lone surrogates, a huge name) come back as observations, never exceptions; ``score``
gives a finite reward and numeric details; ``close`` is idempotent; and, where the env offers
``reference_calls(task)``, replaying them scores the best reward (1.0) while doing nothing
scores less.
"""

from __future__ import annotations

import asyncio
import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from relayrl.types import ToolCall

from .base import Env, Reset, Score, StepResult
from .sandbox import ExecResult, SandboxPathError, SandboxProvider


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


class _Checker:
    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    async def run(self, name: str, fn: Callable[[], Awaitable[str | None]], timeout_s: float) -> bool:
        start = time.monotonic()
        try:
            detail = await asyncio.wait_for(fn(), timeout_s) or ""
            ok = True
        except AssertionError as e:
            ok, detail = False, str(e) or "assertion failed"
        except asyncio.TimeoutError:
            ok, detail = False, f"took longer than {timeout_s:g}s"
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        self.results.append(CheckResult(name, ok, detail, time.monotonic() - start))
        return ok


def hostile_calls(tools: list[dict[str, Any]]) -> list[tuple[str, ToolCall]]:
    """Malformed calls a policy under training will eventually make."""
    calls = [
        ("unknown tool", ToolCall("no_such_tool_xyz", {})),
        ("huge tool name", ToolCall("x" * 100_000, {})),
        ("non-UTF-8 tool name", ToolCall("bad\udcff", {})),
    ]
    for schema in tools:
        fn = schema.get("function", {})
        name = fn.get("name", "")
        props = fn.get("parameters", {}).get("properties", {}) or {}
        required = fn.get("parameters", {}).get("required", []) or []
        calls.append((f"{name}: extra argument", ToolCall(name, {**{k: "x" for k in props}, "zz_extra": 1})))
        if required:
            calls.append((f"{name}: missing arguments", ToolCall(name, {})))
        for key in props:
            calls.append((f"{name}.{key}: wrong type", ToolCall(name, {**{k: "x" for k in props}, key: {"a": [1]}})))
            calls.append((f"{name}.{key}: 1 MiB", ToolCall(name, {**{k: "x" for k in props}, key: "y" * (1 << 20)})))
            calls.append((f"{name}.{key}: lone surrogate", ToolCall(name, {**{k: "x" for k in props}, key: "a\udc80b"})))
    return calls


def _check_reset(reset: Any) -> None:
    assert isinstance(reset, Reset), f"reset() returned {type(reset).__name__}, not envs.base.Reset"
    assert reset.messages, "reset() returned no messages"
    for m in reset.messages:
        assert isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str), \
            f"a message is not {{role: str, content: str}}: {str(m)[:200]}"
    for t in reset.tools:
        fn = t.get("function") if isinstance(t, dict) else None
        assert isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict), \
            f"a tool schema is not {{type: function, function: {{...}}}}: {str(t)[:200]}"
        assert isinstance(fn.get("name"), str) and fn["name"], "a tool has no name"
        params = fn.get("parameters", {"type": "object"})
        assert params.get("type") == "object", f"tool {fn['name']}: parameters must be a JSON object schema"


def _check_score(score: Any) -> float:
    assert isinstance(score, Score), f"score() returned {type(score).__name__}, not envs.base.Score"
    assert isinstance(score.reward, (int, float)) and math.isfinite(score.reward), f"reward {score.reward!r} is not finite"
    for k, v in score.details.items():
        assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v), \
            f"details[{k!r}] = {v!r} is not a finite number"
    return float(score.reward)


async def _episode(env: Env, task: dict[str, Any], calls: list[ToolCall]) -> float:
    try:
        _check_reset(await env.reset(task))
        for call in calls:
            result = await env.step(call)
            assert isinstance(result, StepResult), f"step() returned {type(result).__name__}"
            if result.done:
                break
        return _check_score(await env.score())
    finally:
        await env.close()


async def check_env(make_env: Callable[[], Env], tasks: list[dict[str, Any]], *,
                    timeout_s: float = 300.0) -> list[CheckResult]:
    """Run the env contract on ``tasks`` (each gets its own fresh env per episode)."""
    c = _Checker()
    env_cls = type(make_env())
    check_task = getattr(env_cls, "check_task", None)
    reference = getattr(env_cls, "reference_calls", None)

    async def tasks_valid() -> str:
        assert tasks, "no tasks"
        if check_task is not None:
            for task in tasks:
                check_task(task)
        return f"{len(tasks)} task(s)"

    await c.run("tasks are valid", tasks_valid, timeout_s)
    first = tasks[0] if tasks else {}

    async def reset_shape() -> str:
        env = make_env()
        try:
            reset = await env.reset(first)
            _check_reset(reset)
            return f"{len(reset.messages)} message(s), tools: {', '.join(t['function']['name'] for t in reset.tools)}"
        finally:
            await env.close()

    if not await c.run("reset returns messages and tool schemas", reset_shape, timeout_s):
        return c.results

    async def hostile() -> str:
        env = make_env()
        try:
            reset = await env.reset(first)
            n = 0
            for label, call in hostile_calls(reset.tools):
                try:
                    result = await env.step(call)
                except Exception as e:
                    raise AssertionError(f"{label}: step raised {type(e).__name__}: {e}") from None
                assert isinstance(result, StepResult) and isinstance(result.observation, str), \
                    f"{label}: step returned {type(result).__name__}"
                n += 1
                if result.done:  # some envs end on a bad call; start a new episode and go on
                    await env.close()
                    env = make_env()
                    reset = await env.reset(first)
            _check_score(await env.score())
            return f"{n} malformed calls answered with observations"
        finally:
            await env.close()

    await c.run("malformed tool calls become observations", hostile, timeout_s)

    async def noop() -> str:
        return f"reward {await _episode(make_env(), first, []):.3f}"

    await c.run("score after no action", noop, timeout_s)

    async def close_twice() -> str:
        env = make_env()
        await env.reset(first)
        await env.close()
        await env.close()
        return ""

    await c.run("close is idempotent", close_twice, timeout_s)

    if reference is not None:
        for task in tasks:
            async def replay(task: dict[str, Any] = task) -> str:
                calls = reference(task)
                if calls is None:
                    return "skipped: the task has no reference solution"
                best = await _episode(make_env(), task, list(calls))
                assert best == 1.0, f"the reference solution scored {best}, not 1.0"
                none = await _episode(make_env(), task, [])
                assert none < best, f"doing nothing scored {none}, as much as the reference"
                return f"reference 1.0, no action {none:.3f}"

            await c.run(f"task {task.get('id', '?')}: reference scores 1.0, no action less", replay, timeout_s)
    return c.results


async def check_sandbox_provider(provider: SandboxProvider, *, timeout_s: float = 120.0) -> list[CheckResult]:
    """Run the sandbox contract: exec, files, path escapes, snapshot, timeouts, close."""
    c = _Checker()

    async def exec_basics() -> str:
        sb = await provider.create({"a.txt": "hello\n"})
        try:
            r = await sb.exec("cat a.txt; echo err >&2; exit 3")
            assert isinstance(r, ExecResult), f"exec returned {type(r).__name__}"
            assert r.exit_code == 3, f"exit code {r.exit_code}, expected 3"
            assert r.stdout == "hello\n" and r.stderr == "err\n", f"stdout {r.stdout!r}, stderr {r.stderr!r}"
            return ""
        finally:
            await sb.close()

    async def files() -> str:
        sb = await provider.create()
        try:
            await sb.write_file("d/x.bin", b"\x00\xff\n")
            assert await sb.read_file("d/x.bin") == b"\x00\xff\n", "bytes did not round-trip"
            r = await sb.exec("printf 'made' > y.txt")
            assert r.exit_code == 0, r.stderr
            snap = await sb.snapshot()
            assert snap.get("y.txt") == b"made" and snap.get("d/x.bin") == b"\x00\xff\n", f"snapshot {sorted(snap)}"
            for bad in ("../escape.txt", "/etc/passwd"):
                try:
                    await sb.read_file(bad)
                except SandboxPathError:
                    continue
                raise AssertionError(f"read_file({bad!r}) did not raise SandboxPathError")
            return ""
        finally:
            await sb.close()

    async def timeout() -> str:
        sb = await provider.create()
        try:
            r = await sb.exec("sleep 30", timeout=1.0)
            assert r.timed_out, f"sleep 30 with timeout 1 s was not reported as timed out: {r}"
            return f"killed after {r.duration_s:.1f}s"
        finally:
            await sb.close()

    async def close_twice() -> str:
        sb = await provider.create()
        await sb.close()
        await sb.close()
        return ""

    await c.run("exec: exit code, stdout, stderr", exec_basics, timeout_s)
    await c.run("files round-trip, snapshot, path escapes refused", files, timeout_s)
    await c.run("a command past its timeout is killed", timeout, timeout_s)
    await c.run("close is idempotent", close_twice, timeout_s)
    isolated = getattr(provider, "network_isolated", None)
    c.results.append(CheckResult("network isolation", bool(isolated),
                                 "no network namespace: commands can reach the network" if not isolated else ""))
    return c.results
