"""The black-box proxy, driven by the real ``openai`` client over HTTP, in front of the real CPU
engine: recorded sub-traces hold exactly the ids the engine saw and sampled, with its logprobs;
a harness that re-serialises its messages continues its sub-trace; one that rewrites its
history opens a second; an interleaved second context becomes a child with a parent link;
errors are OpenAI-shaped."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
import torch
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
                       reserialise: bool = False, conversation: str | None = None) -> None:
    """A toy harness: the env's messages and tools, each tool call run on the env directly (the
    harness executes its own tools). ``rewrite``: after the first turn, restart from the system
    message and the last observation as a user message. ``reserialise``: send tool-call
    arguments back re-encoded with other spacing. ``conversation``: sent in the
    ``X-Relayrl-Conversation`` header of every call."""
    reset = await env.reset(TASK)
    messages: list[dict] = list(reset.messages)
    headers = {"X-Relayrl-Conversation": conversation} if conversation else None
    for turn in range(TURNS):
        reply = (await client.chat.completions.create(model="any", messages=messages, tools=reset.tools,
                                                      extra_headers=headers)).choices[0].message
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


def run_harness(parts, rewrite=False, reserialise=False, conversation=None, **kw):
    engine, chat = parts
    rec = RecordingEngine(engine)
    proxy = EpisodeProxy(rec, chat, PlainParser(), settings(**kw))

    async def go():
        client = await serve(proxy)
        try:
            await echo_harness(client, ToyEchoEnv(num_turns=TURNS), rewrite, reserialise, conversation)
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
    """The harness names its conversation (``main``), so the rewritten context continues the
    main chain across the cut and takes the reward."""
    proxy, rec, subs = run_harness(parts, rewrite=True, conversation="main")
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
            reply = (await client.chat.completions.create(model="m", messages=msgs)).choices[0].message
            more = msgs + [reply.model_dump(exclude_none=True), {"role": "user", "content": "say w2"}]
            with pytest.raises(openai.BadRequestError, match="max_calls"):
                await client.chat.completions.create(model="m", messages=more)
        finally:
            await wrong.close()
            await client.close()
            await proxy.close()
    asyncio.run(go())
    assert proxy.truncated and proxy.calls == 1  # the main conversation ended on the cap


# ---------------------------------------------------------------------------- hostile requests

USER = {"role": "user", "content": "say w1"}


async def raw_request(proxy: EpisodeProxy, port: int, path: str, data: str | None = None,
                      method: str = "POST") -> tuple[int, str, object]:
    """(status, content type, decoded JSON body or None) of one request with the episode's key."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{port}{path}", data=data,
                                   headers={"Authorization": f"Bearer {proxy.api_key}",
                                            "Content-Type": "application/json"}) as r:
            text = await r.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            return r.status, r.content_type, body


def hostile(parts, requests: list[tuple[str, str | None, str]]) -> list[tuple[int, str, object]]:
    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, PlainParser(), settings())

    async def go():
        port = await proxy.start_tcp()
        try:
            return [await raw_request(proxy, port, path, data, method) for path, data, method in requests]
        finally:
            await proxy.close()
    return asyncio.run(go())


def assert_openai_error(got: tuple[int, str, object], status: int, match: str) -> None:
    code, content_type, body = got
    assert (code, content_type) == (status, "application/json"), got
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "code"}, body
    assert match in body["error"]["message"], body


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("body, field", [
    ({"messages": [USER, {"role": "assistant", "content": "w1", "tool_calls": 5}, USER]}, "messages[1].tool_calls"),
    ({"messages": [USER], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ({"messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "relayrl_conversation": 7}, "relayrl_conversation"),
    (NESTED, "nested"),
    ('{"messages": ' + NESTED + "}", "nested"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
])
def test_a_malformed_request_is_a_json_400_naming_the_field(parts, body, field):
    data = body if isinstance(body, str) else json.dumps(body)
    [got] = hostile(parts, [("/v1/chat/completions", data, "POST")])
    assert_openai_error(got, 400, field)


def test_unknown_paths_and_methods_get_json_errors(parts):
    missing, method = hostile(parts, [("/v1/nothing", "{}", "POST"), ("/v1/chat/completions", None, "GET")])
    assert_openai_error(missing, 404, "/v1/nothing")
    assert_openai_error(method, 405, "GET")


# ---------------------------------------------------------------------------- episode rules

async def env_step_http(port: int, key: str, name: str, arguments: dict) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/relayrl/v1/env/step",
                                json={"name": name, "arguments": arguments},
                                headers={"Authorization": f"Bearer {key}"}) as r:
            return await r.json()


def test_calls_after_the_env_says_done_are_refused_and_not_recorded(parts):
    """The env says done at its first tool call; the harness asks the policy once more (a
    "wrap-up" turn): it gets a 409, and nothing after done is in the recorded tokens."""
    engine, chat = parts
    rec = RecordingEngine(engine)

    async def env_step(call: ToolCall) -> tuple[str, bool]:
        return "correct", True
    proxy = EpisodeProxy(rec, chat, PlainParser(), settings(), env_step=env_step)

    async def go():
        port = await proxy.start_tcp()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=proxy.api_key, max_retries=0)
        try:
            msgs = [{"role": "system", "content": "repeat the word"}, USER]
            reply = (await client.chat.completions.create(model="m", messages=msgs,
                                                          tools=[ANSWER_TOOL])).choices[0].message
            call = reply.tool_calls[0]
            assert (await env_step_http(port, proxy.api_key, "answer", {"text": "w1"}))["done"] is True
            msgs += [reply.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "correct"}]
            with pytest.raises(openai.ConflictError, match="done"):
                await client.chat.completions.create(model="m", messages=msgs, tools=[ANSWER_TOOL])
            with pytest.raises(openai.ConflictError, match="done"):
                await client.chat.completions.create(model="m", messages=[USER])
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    subs = proxy.sub_traces("t", 1.0, True)
    assert len(rec.log) == 1 and proxy.calls == 1 and len(subs) == 1
    prompt, out = rec.log[0]
    assert subs[0].tokens == prompt + out.output_ids and sum(subs[0].loss_mask) == len(out.output_ids)
    assert subs[0].reward == 1.0 and not proxy.truncated


def test_one_oversized_call_fails_alone_and_truncates_only_an_episode_that_ends_on_it(parts):
    """max_context_tokens 40: an oversized first prompt is a 400 and the next call is served
    (not truncated); the main conversation's next call overflowing its context is a 400 too,
    and the episode, ending there, is truncated."""
    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, PlainParser(), settings(max_context_tokens=40))
    states = []

    async def go():
        client = await serve(proxy)
        try:
            with pytest.raises(openai.BadRequestError, match="max_context_tokens"):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say " * 50}])
            reply = (await client.chat.completions.create(model="m", messages=[USER])).choices[0].message
            states.append(proxy.truncated)
            long = [USER, reply.model_dump(exclude_none=True), {"role": "user", "content": "say " * 30}]
            with pytest.raises(openai.BadRequestError, match="max_context_tokens"):
                await client.chat.completions.create(model="m", messages=long)
            states.append(proxy.truncated)
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    assert states == [False, True] and proxy.calls == 1 and proxy.truncation == "context_length_exceeded"
    [sub] = proxy.sub_traces("t", 1.0, terminal=not proxy.truncated)
    assert sub.reward == 1.0 and not sub.terminal


def advantages(subs) -> list[list[float]]:
    """GAE advantages of each sub-trace's action tokens with V = 0, gamma = lam = 1: every action
    gets the task reward that reaches it through the chain, and nothing else."""
    from relayrl.rl.batching import chained_gae, pad, rewards_tensor

    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    adv, _ = chained_gae(subs, rewards_tensor(subs, masks), torch.zeros(masks.shape), masks, 1.0, 1.0)
    return [adv[i][masks[i].bool()].tolist() for i in range(len(subs))]


def test_a_side_call_after_the_work_takes_no_reward(parts):
    """Two calls of the main conversation, then a fresh context ("summarize what you did") that
    no later call continues: a side chain, numbered before the main chain, a child at the end of
    the main chain's last sub-trace. The reward is the main chain's: with V = 0 and gamma = lam =
    1 each main action's advantage is the reward, 1.0; the summary's are 0."""
    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, PlainParser(), settings())

    async def go():
        client = await serve(proxy)
        try:
            a = [{"role": "system", "content": "repeat the word"}, USER]
            r = (await client.chat.completions.create(model="m", messages=a)).choices[0].message
            a += [r.model_dump(exclude_none=True), {"role": "user", "content": "say w2"}]
            await client.chat.completions.create(model="m", messages=a)
            await client.chat.completions.create(model="m", messages=[
                {"role": "system", "content": "you summarise"}, {"role": "user", "content": "w1 w2"}])
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    subs = proxy.sub_traces("t", 1.0, True)
    side, main = subs
    assert (side.segment, side.parent_segment, main.segment, main.parent_segment) == (0, 1, 1, -1)
    assert side.parent_position == len(main.tokens)
    assert (main.reward, main.terminal, side.reward, side.terminal) == (1.0, True, 0.0, False)
    side_adv, main_adv = advantages(subs)
    assert main_adv == [1.0] * sum(main.loss_mask) and side_adv == [0.0] * sum(side.loss_mask)


def test_a_named_conversation_keeps_a_summary_that_extends_the_main_context_apart(parts):
    """``relayrl_conversation`` in the body: a call named ``summary`` whose messages extend the
    main context still opens a sub-trace of its own (rendered afresh, its earlier replies prompt)
    and takes no reward."""
    engine, chat = parts
    rec = RecordingEngine(engine)
    proxy = EpisodeProxy(rec, chat, PlainParser(), settings())
    got = []

    async def go():
        client = await serve(proxy)
        try:
            a = [{"role": "system", "content": "repeat the word"}, USER]
            r = await client.chat.completions.create(model="m", messages=a)
            a += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "say w2"}]
            s = await client.chat.completions.create(model="m", messages=a,
                                                     extra_body={"relayrl_conversation": "summary"})
            got.extend([r.model_extra["relayrl_conversation"], s.model_extra["relayrl_conversation"]])
        finally:
            await client.close()
            await proxy.close()
    asyncio.run(go())
    assert got == ["main", "summary"]
    subs = proxy.sub_traces("t", 1.0, True)
    side, main = subs
    assert main.tokens == rec.log[0][0] + rec.log[0][1].output_ids and main.reward == 1.0
    assert side.reward == 0.0 and side.parent_segment == 1
    assert side.tokens == rec.log[1][0] + rec.log[1][1].output_ids
    assert side.loss_mask == [0] * len(rec.log[1][0]) + [1] * len(rec.log[1][1].output_ids)


def test_an_unnamed_rewrite_is_a_side_chain(parts):
    """The documented default: a context that extends no earlier one, from a harness that names
    no conversation, is a side chain; the reward stays with the first conversation."""
    proxy, rec, subs = run_harness(parts, rewrite=True)
    side, main = subs
    assert main.tokens == rec.log[0][0] + rec.log[0][1].output_ids
    assert (main.reward, side.reward, side.parent_segment, side.parent_position) == (1.0, 0.0, 1, len(main.tokens))
    assert_token_exact(subs, rec)


def test_side_links_never_loop(parts):
    """Two side contexts each taken for the other's sub-agent (interleaved calls can do that):
    the link that closes the loop goes to the main chain's end, so GAE's checks pass."""
    from relayrl.rl.batching import continuation_rows
    from relayrl.rollout.proxy import _Trace

    engine, chat = parts
    proxy = EpisodeProxy(engine, chat, PlainParser(), settings())
    for i, conv in enumerate(["main", "side-1", "side-2"]):
        tr = _Trace(i, conv, "null", None, [], [])
        tr.ctx.extend([1, 2, 3], 0)
        tr.ctx.extend([4], 1, [-0.5])
        proxy.traces.append(tr)
    proxy.traces[1].parent, proxy.traces[1].parent_position = 2, 1
    proxy.traces[2].parent, proxy.traces[2].parent_position = 1, 2
    subs = proxy.sub_traces("t", 1.0, True)
    continuation_rows(subs)
    # side-1 closes the loop (side-1 -> side-2 -> side-1) and goes to the end of main's 4 tokens.
    assert [s.parent_segment for s in subs] == [2, 0, -1] and [s.parent_position for s in subs] == [4, 2, -1]
