"""The black-box proxy, driven by the real ``openai`` client over HTTP, in front of the real CPU
engine: recorded sub-traces hold exactly the ids the engine saw and sampled, with its logprobs;
a harness that re-serialises its messages continues its sub-trace; one that rewrites its
history opens a second; an interleaved second context becomes a child with a parent link;
errors are OpenAI-shaped."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from transformers import AutoTokenizer

from relayrl.envs.toy import ANSWER_TOOL, ToyEchoEnv
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.engine import Completion, GenerateRequest
from relayrl.rollout.parsers import HermesParser, PlainParser
from relayrl.rollout.proxy import EpisodeProxy, ProxySettings
from relayrl.types import ToolCall

TURNS = 3
TASK = ToyEchoEnv.default_tasks(num_tasks=1, num_turns=TURNS)[0]


class RecordingEngine:
    """The real engine, with every request and completion it served kept for comparison."""

    def __init__(self, engine: CpuEngine) -> None:
        self.engine = engine
        self.log: list[tuple[list[int], Completion]] = []

    async def generate(self, request: GenerateRequest) -> Completion:
        out = await self.engine.generate(request)
        self.log.append((list(request.input_ids), out))
        return out


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    engine = CpuEngine(tiny_model_dir, max_batch_size=4, max_seq_len=256, num_threads=1)
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), PlainParser())
    yield engine, chat
    engine.shutdown()


def settings(**kw) -> ProxySettings:
    return ProxySettings(**{"max_new_tokens": 2, "max_context_tokens": 256, "seed": 3, **kw})


async def serve(proxy: EpisodeProxy) -> openai.AsyncOpenAI:
    port = await proxy.start_tcp()
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=proxy.api_key, max_retries=0)


async def echo_harness(client: openai.AsyncOpenAI, env: ToyEchoEnv, rewrite: bool = False,
                       reserialise: bool = False) -> None:
    """A toy harness: the env's messages and tools, each tool call run on the env directly (the
    harness executes its own tools). ``rewrite``: after the first turn, restart from the system
    message and the last observation as a user message. ``reserialise``: send tool-call
    arguments back re-encoded with other spacing."""
    reset = await env.reset(TASK)
    messages: list[dict] = list(reset.messages)
    for turn in range(TURNS):
        reply = (await client.chat.completions.create(model="any", messages=messages, tools=reset.tools)).choices[0].message
        m = reply.model_dump(exclude_none=True)
        if reserialise:
            for c in m["tool_calls"]:
                c["function"]["arguments"] = json.dumps(json.loads(c["function"]["arguments"]), indent=2)
        messages.append(m)
        call = reply.tool_calls[0]
        result = await env.step(ToolCall(call.function.name, json.loads(call.function.arguments)))
        if result.done:
            return
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result.observation})
        if rewrite and turn == 0:
            messages = [messages[0], {"role": "user", "content": result.observation}]


def run_harness(parts, rewrite=False, reserialise=False, **kw):
    engine, chat = parts
    rec = RecordingEngine(engine)
    proxy = EpisodeProxy(rec, chat, PlainParser(), settings(**kw))

    async def go():
        client = await serve(proxy)
        try:
            await echo_harness(client, ToyEchoEnv(num_turns=TURNS), rewrite, reserialise)
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    return proxy, rec, proxy.sub_traces("t0", reward=1.0, terminal=True)


def assert_token_exact(subs, rec: RecordingEngine) -> None:
    """Every engine call is a prefix of one sub-trace followed by exactly its sampled ids and
    logprobs (loss_mask 1); every loss_mask-1 token is one of those samples."""
    covered = {id(s): [0] * len(s.tokens) for s in subs}
    for prompt, out in rec.log:
        hits = [s for s in subs if s.tokens[:len(prompt)] == prompt
                and s.tokens[len(prompt):len(prompt) + len(out.output_ids)] == out.output_ids]
        assert len(hits) == 1, "an engine call is in no sub-trace (or in two)"
        s = hits[0]
        span = slice(len(prompt), len(prompt) + len(out.output_ids))
        assert s.loss_mask[span] == [1] * len(out.output_ids)
        assert s.rollout_logprobs[span] == out.output_logprobs
        covered[id(s)][span] = [1] * len(out.output_ids)
    for s in subs:
        assert covered[id(s)] == s.loss_mask


def test_a_linear_harness_is_one_sub_trace_equal_to_the_white_box_episode(parts):
    proxy, rec, subs = run_harness(parts)
    assert len(rec.log) == TURNS and proxy.calls == TURNS
    assert len(subs) == 1 and subs[0].kind == "blackbox" and subs[0].reward == 1.0 and subs[0].terminal
    assert_token_exact(subs, rec)
    # The white-box loop with the same seed builds the very same context, token for token.
    engine, chat = parts
    limits = AgentLimits(max_turns=TURNS, max_new_tokens=2, max_context_tokens=256)
    wb = asyncio.run(run_episode(EpisodeJob(TASK, 0, seed=3), ToyEchoEnv(num_turns=TURNS), engine, chat,
                                 PlainParser(), limits)).sub_traces[0]
    assert (subs[0].tokens, subs[0].loss_mask, subs[0].rollout_logprobs) == (wb.tokens, wb.loss_mask, wb.rollout_logprobs)


def test_re_serialised_tool_calls_still_continue_the_sub_trace(parts):
    _, rec, subs = run_harness(parts, reserialise=True)
    assert len(subs) == 1
    assert_token_exact(subs, rec)


def test_a_harness_that_rewrites_its_history_opens_a_second_sub_trace(parts):
    proxy, rec, subs = run_harness(parts, rewrite=True)
    assert len(subs) == 2 and proxy.calls == TURNS
    assert [s.segment for s in subs] == [0, 1] and all(s.num_segments == 2 for s in subs)
    assert [s.parent_segment for s in subs] == [-1, -1]  # a compaction-like cut: one main chain
    assert [s.reward for s in subs] == [0.0, 1.0] and [s.terminal for s in subs] == [False, True]
    assert sum(subs[0].loss_mask) > 0 and sum(subs[1].loss_mask) > 0
    assert_token_exact(subs, rec)
    # The second context starts from the rewritten messages, rendered afresh: prompt only.
    first_action = subs[1].loss_mask.index(1)
    assert rec.log[1][0] == subs[1].tokens[:first_action]


def test_an_interleaved_context_that_returns_becomes_a_child(parts):
    """Main context A, then a sub-agent context B (two calls), then A continues with B's answer:
    B is A's child, returning where A's continuation starts."""
    engine, chat = parts
    rec = RecordingEngine(engine)
    proxy = EpisodeProxy(rec, chat, PlainParser(), settings())
    tools = [ANSWER_TOOL]

    async def go():
        client = await serve(proxy)
        try:
            a = [{"role": "system", "content": "repeat the word"}, {"role": "user", "content": "say w1"}]
            r = (await client.chat.completions.create(model="m", messages=a, tools=tools)).choices[0].message
            a += [r.model_dump(exclude_none=True)]
            b = [{"role": "system", "content": "the word"}, {"role": "user", "content": "say w2"}]
            r2 = (await client.chat.completions.create(model="m", messages=b, tools=tools)).choices[0].message
            b += [r2.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": r2.tool_calls[0].id, "content": "w3"}]
            r3 = (await client.chat.completions.create(model="m", messages=b, tools=tools)).choices[0].message
            a += [{"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": r3.tool_calls[0].function.arguments}]
            await client.chat.completions.create(model="m", messages=a, tools=tools)
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    subs = proxy.sub_traces("t", 1.0, True)
    assert [len(s.tokens) > 0 for s in subs] == [True, True]
    child, main = subs
    assert (child.segment, child.parent_segment, main.segment, main.parent_segment) == (0, 1, 1, -1)
    assert main.reward == 1.0 and child.reward == 0.0
    assert sum(child.loss_mask) == len(rec.log[1][1].output_ids) + len(rec.log[2][1].output_ids)
    # The child's answer returns where A's tokens continue after its first reply.
    assert child.parent_position == len(rec.log[0][0]) + len(rec.log[0][1].output_ids)
    assert_token_exact(subs, rec)


def test_hermes_tool_calls_come_back_as_openai_tool_calls(parts):
    """A reply with a Hermes tool call is split into content and ``tool_calls``; a harness that
    sends it back (as the client gives it) continues the sub-trace."""
    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, HermesParser(), settings())
    text = 'ok <tool_call>{"name": "answer", "arguments": {"text": "w1"}}</tool_call>'
    message, calls = proxy._reply(text, type("T", (), {"tools": [1], "events": []})(), 0)
    assert message["content"] == "ok" and calls == [("answer", {"text": "w1"})]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"text": "w1"}


def test_errors_are_openai_shaped(parts):
    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, PlainParser(), settings(max_calls=1, max_context_tokens=40))
    msgs = [{"role": "user", "content": "say w1"}]

    async def go():
        client = await serve(proxy)
        wrong = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="not-the-key", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError):
                await wrong.chat.completions.create(model="m", messages=msgs)
            with pytest.raises(openai.BadRequestError, match="streaming"):
                await client.chat.completions.create(model="m", messages=msgs, stream=True)
            with pytest.raises(openai.BadRequestError, match="context_length|max_context"):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say " * 50}])
            await client.chat.completions.create(model="m", messages=msgs)
            with pytest.raises(openai.BadRequestError, match="max_calls"):
                await client.chat.completions.create(model="m", messages=msgs)
        finally:
            await wrong.close()
            await client.close()
            await proxy.close()
    asyncio.run(go())
    assert proxy.truncated and proxy.calls == 1
