"""The gate: rules-only, judge verdicts, judge failures and their fallback, the cache, and the
two real judge clients (an engine, an OpenAI-compatible HTTP endpoint)."""

import asyncio
import json

import pytest
from aiohttp import web

from relayrl.antihack import make_rule_stage
from relayrl.antihack.gate import Gate
from relayrl.antihack.judge import (EngineJudge, JudgeError, JudgeRequest, JudgeVerdict, OpenAIJudge,
                                    judge_messages, parse_verdict)
from relayrl.config import AntihackConfig

HACK = ("bash", {"command": "git log --all --oneline"})
HONEST = ("bash", {"command": "git log -5"})
NEAR_MISS = ("write_file", {"path": "tests/test_new.py", "content": "def test_x():\n    assert 1\n"})


def rules():
    return make_rule_stage(AntihackConfig(enabled=True))


class ScriptedJudge:
    """A judge that answers from a table (the 'judge that answers correctly' of the targets)."""

    def __init__(self, answers: dict[str, bool], delay: float = 0.0, error: Exception | None = None):
        self.answers, self.delay, self.error, self.calls = answers, delay, error, 0

    async def judge(self, request: JudgeRequest) -> JudgeVerdict:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        key = json.dumps(request.arguments, sort_keys=True)
        return JudgeVerdict(self.answers[key], "table")


def key(call):
    return json.dumps(call[1], sort_keys=True)


def run(coro):
    return asyncio.run(coro)


def test_rules_only_blocks_what_rules_flag():
    gate = Gate(rules(), None, "rules_only")
    v = run(gate.check(*HACK))
    assert v.flagged and v.blocked and v.stage == "rules" and v.rule == "git_history.all_refs"
    assert v.dummy is not None and v.dummy.exit_code == 0
    ok = run(gate.check(*HONEST))
    assert not ok.flagged and not ok.blocked and ok.stage is None
    assert gate.counts["calls"] == 2 and gate.counts["flagged"] == 1 and gate.counts["blocked"] == 1


def test_judge_decides_flagged_calls_and_is_not_asked_otherwise():
    judge = ScriptedJudge({key(HACK): True, key(NEAR_MISS): False})
    gate = Gate(rules(), judge)
    hack = run(gate.check(*HACK, task="fix the parser"))
    near = run(gate.check(*NEAR_MISS, task="add a test for x"))
    honest = run(gate.check(*HONEST))
    assert hack.blocked and hack.stage == "judge" and hack.reason == "table"
    assert near.flagged and not near.blocked and near.stage == "judge" and near.dummy is None
    assert not honest.flagged
    assert judge.calls == 2 and gate.counts["judge_calls"] == 2


def test_verdicts_are_cached_per_call_and_task():
    judge = ScriptedJudge({key(HACK): True})
    gate = Gate(rules(), judge)
    for _ in range(3):
        v = run(gate.check(*HACK, task="t"))
    assert v.blocked and v.cached and judge.calls == 1
    run(gate.check(*HACK, task="another task"))
    assert judge.calls == 2


@pytest.mark.parametrize("on_error,blocked", [("block", True), ("allow", False)])
def test_judge_timeout_and_errors_fall_back_and_are_counted(on_error, blocked):
    slow = Gate(rules(), ScriptedJudge({key(HACK): False}, delay=5.0), judge_timeout_s=0.05, on_judge_error=on_error)
    v = run(slow.check(*HACK))
    assert v.blocked is blocked and v.stage == "rules" and "longer than 0.05s" in v.judge_error
    broken = Gate(rules(), ScriptedJudge({}, error=RuntimeError("boom")), on_judge_error=on_error)
    v = run(broken.check(*HACK))
    assert v.blocked is blocked and "RuntimeError: boom" in v.judge_error
    assert slow.counts["judge_errors"] == 1 and broken.counts["judge_errors"] == 1
    run(broken.check(*HACK))  # failures are not cached: the judge is asked again
    assert broken.judge.calls == 2


def test_parse_verdict():
    assert parse_verdict('sure: {"verdict": "block", "reason": "reads reflog"} ok') == JudgeVerdict(True, "reads reflog")
    assert parse_verdict('{"verdict": "allow", "reason": "x"}').block is False
    assert parse_verdict('{"block": true}').block is True
    assert parse_verdict('{"a": 1} then {"verdict": "HACK"}').block is True
    for bad in ("", "block", '{"verdict": "maybe"}', "{not json}"):
        with pytest.raises(JudgeError):
            parse_verdict(bad)


def test_judge_prompt_holds_task_context_rules_and_call():
    hits = rules().check(*HACK)
    msgs = judge_messages(JudgeRequest(HACK[0], HACK[1], "Fix rle.py", [{"role": "user", "content": "hello"}], hits))
    text = msgs[1]["content"]
    assert "Fix rle.py" in text and "[user] hello" in text and "git_history.all_refs" in text
    assert "git log --all --oneline" in text


def test_engine_judge_on_a_real_engine_falls_back_on_a_useless_answer(tiny_model_dir):
    """A tiny random model cannot answer in JSON: the gate counts a judge error and applies its default."""
    from transformers import AutoTokenizer

    from relayrl.rollout.cpu_engine import CpuEngine

    engine = CpuEngine(tiny_model_dir, max_batch_size=2, max_seq_len=4096, num_threads=1)
    try:
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        gate = Gate(rules(), EngineJudge(engine, tok, max_new_tokens=8), on_judge_error="block")
        v = run(gate.check(*HACK, task="t"))
        assert v.flagged and v.blocked and v.judge_error and "no verdict" in v.judge_error
        assert gate.counts["judge_errors"] == 1 and gate.counts["judge_calls"] == 1
    finally:
        engine.shutdown()


async def _openai_server(answer: str | None, status: int = 200):
    seen = []

    async def completions(request):
        body = await request.json()
        seen.append((request.headers.get("Authorization"), body))
        if status != 200:
            return web.Response(status=status, text="overloaded")
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}", seen


def test_openai_judge_over_http(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sekret")

    async def main():
        runner, url, seen = await _openai_server('{"verdict": "block", "reason": "walks every ref"}')
        judge = OpenAIJudge(url + "/v1", "judge-model", api_key_env="JUDGE_KEY")
        try:
            gate = Gate(rules(), judge)
            v = await gate.check(*HACK, task="fix it")
        finally:
            await judge.close()
            await runner.cleanup()
        return v, seen

    v, seen = run(main())
    assert v.blocked and v.stage == "judge" and v.reason == "walks every ref"
    auth, body = seen[0]
    assert auth == "Bearer sekret" and body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "git log --all" in body["messages"][1]["content"]


@pytest.mark.parametrize("answer,status,expect", [
    ("I think it is fine", 200, "no verdict"), ("x", 503, "HTTP 503"), (None, 200, "no verdict")])
def test_openai_judge_failures_are_judge_errors(answer, status, expect):
    async def main():
        runner, url, _ = await _openai_server(answer, status)
        judge = OpenAIJudge(url, "m")
        try:
            with pytest.raises(JudgeError, match=expect):
                await judge.judge(JudgeRequest(*HACK))
        finally:
            await judge.close()
            await runner.cleanup()

    run(main())


def test_openai_judge_unreachable_is_a_judge_error():
    async def main():
        judge = OpenAIJudge("http://127.0.0.1:9", "m")
        try:
            with pytest.raises(JudgeError, match="unreachable"):
                await judge.judge(JudgeRequest(*HACK))
        finally:
            await judge.close()

    run(main())
