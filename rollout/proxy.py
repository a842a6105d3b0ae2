"""Black-box rollouts: a per-episode OpenAI-compatible endpoint in front of the engine.

An agent harness relayrl cannot change drives the policy through ``POST /v1/chat/completions``
(with ``tools`` / ``tool_calls``). ``EpisodeProxy`` is bound to one episode: it turns each
request's messages into the exact token context the engine is asked to continue, samples with
the run's settings, and records what the engine saw and produced, token by token, with the
engine's logprobs. Nothing is re-tokenised afterwards: the recorded ids are the ids that went
to the engine and came back from it.

Sub-traces. The proxy keeps every context it has served. A request whose messages are a context
it served, *plus* new messages after the assistant reply it returned (tool results, a user
turn), continues that sub-trace: its tokens are the sub-trace's tokens so far (the sampled ids
included, exactly), then the ids of the new messages (``ChatFormat.continuation_ids``,
loss_mask 0), then the new sample (loss_mask 1). Any other request (the harness compacted or
rewrote its history, or started a sub-agent with a context of its own) opens a new sub-trace of
the same trajectory, rendered from its messages; earlier replies in it are prompt (loss_mask 0;
they were trained where they were sampled). An assistant message is recognised as one the
proxy returned by its content and its tool calls (name and decoded arguments), so a harness may
re-serialise them; it then stands for the exact text that was sampled.

Conversations: which sub-traces form the main chain, the one whose last sub-trace carries the
task reward. Every sub-trace belongs to one conversation, named by the harness or by the proxy:

- A call may name the conversation it belongs to: ``"relayrl_conversation": NAME`` in the body
  (``extra_body`` of the ``openai`` client) or the header ``X-Relayrl-Conversation: NAME`` (for
  harnesses that also talk to endpoints that refuse unknown fields). It continues the served
  context *of that conversation* its messages extend, or opens a new sub-trace at the end of
  that conversation's chain (a compaction or rewrite: GAE runs on across the cut).
- A call that names none continues the served context its messages extend, in whatever
  conversation that is. Otherwise it opens a new conversation: the episode's first context opens
  ``main``; any later one (a rewritten history, a "summarize" or "title" side call, a
  sub-agent) opens a side conversation (``side-1``, ``side-2``, ...).
- The main chain is the conversation ``main`` (or, in a harness that names conversations but
  never ``main``, the first call's). Its sub-traces, in the order they were opened, form the
  chain; the last carries the reward. Each reply says its conversation
  (``relayrl_conversation`` in the response body).
- Side conversations get no task reward. One that was opened while another context waited, and
  after which that one continued, is a sub-agent of it: ``parent_segment`` is that context and
  ``parent_position`` the point where it continues (GAE continues from the child's last action
  to the parent's next one, ``rl/batching.py``). A side sub-trace that no later call returned
  to continues at the next sub-trace of its own conversation, or, the last of it, at the end of
  the main chain (``parent_position`` = its length), where the episode ends: its actions see
  no task reward, only the critic's values.

So a harness that rewrites its history and wants the rewritten context to continue the main
chain names its conversation (``X-Relayrl-Conversation: main`` on every call); one that does not
gets the rewritten context as a side chain, and the reward stays with the context it left.

The episode's end. Once the env says done (``/relayrl/v1/env/step``), chat calls are refused
with a 409 (``episode_done``): nothing after done is sampled, recorded or trained. A call
refused at a cap (its context over ``rollout.max_context_tokens``, ``blackbox.max_calls``,
``blackbox.max_sub_traces``) is a 400 for that call alone; the episode counts as truncated only
when the main conversation's last call was such a refusal (it ended because of it).

Sampling is the run's, not the harness's: ``temperature``, ``top_p``, ``seed`` and ``stop`` in a
request are ignored (the trainer recomputes logprobs at the rollout temperature, and a harness
that lowers it would make them disagree); ``max_tokens`` / ``max_completion_tokens`` may only
lower the per-call budget (both alike: a positive integer, or a 400). ``n`` > 1 and ``stream``
are refused with a 400. A malformed request (a field of the wrong type, a tool without
``function``, JSON nested past Python's recursion limit) is a 400, and an unknown path or method
a 404 / 405, all in the OpenAI error shape (``{"error": {"message", "type", "code"}}``).

Besides the chat endpoint, the proxy serves the env's own tools for harnesses that want relayrl
to execute them (``POST /relayrl/v1/env/step``), and the task (``GET /relayrl/v1/task``).
Every endpoint needs the per-episode key (``Authorization: Bearer KEY``).

What the anti-hack gate sees: the calls a harness sends to ``/relayrl/v1/env/step`` pass the
gate like white-box tool calls (blocked ones get the dummy output). Tools a harness executes
itself never reach relayrl: the gate cannot see or stop them. The tool calls are still in the
recorded tokens (the policy's own output), so they can be audited afterwards, but not blocked;
keep such harnesses in sandboxes whose isolation is the protection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from relayrl.types import Event, ParseError, SubTrace, ToolCall

from .agent import _Context, turn_seed
from .chat import ChatFormat, TemplateError
from .engine import Engine, EngineError, GenerateRequest, SamplingParams

log = logging.getLogger(__name__)

EnvStep = Callable[[ToolCall], Awaitable[tuple[str, bool]]]

MAIN = "main"
CONVERSATION_FIELD = "relayrl_conversation"
CONVERSATION_HEADER = "X-Relayrl-Conversation"
ENDPOINTS = "POST /v1/chat/completions, GET /v1/models, POST /relayrl/v1/env/step, GET /relayrl/v1/task"


@dataclass
class ProxySettings:
    """The episode's sampling and caps (from ``rollout`` and ``blackbox``).

    max_new_tokens: the per-call budget (a request may lower it). max_context_tokens: the
    longest context one sub-trace may reach. seed: base of per-call sampling seeds (None =
    the engine's RNG). max_calls / max_sub_traces: caps; past them requests get a 400 (the
    episode is truncated when its main conversation ends on one).
    """

    max_new_tokens: int
    max_context_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_calls: int = 64
    max_sub_traces: int = 16
    model_name: str = "relayrl-policy"


class ProxyError(Exception):
    """A request the proxy answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": str(self), "type": self.code, "code": self.code}},
                                 status=self.status)


@dataclass
class _Trace:
    """One context the proxy served: becomes one sub-trace."""

    index: int
    conversation: str
    tools_key: str
    tools: list[dict[str, Any]] | None
    messages: list[dict[str, Any]]  # the harness's messages (canonical form), last = our reply
    rendered: list[dict[str, str]]  # the same, as rendered (tool instructions, sampled text)
    ctx: _Context = field(default_factory=_Context)
    weight_version: int | None = None
    calls: int = 0
    stopped: bool = True
    waiting_since: int = 0  # the proxy's trace count when this trace last returned a reply
    parent: int = -1
    parent_position: int = -1
    busy: bool = False  # a generation is in flight: no other request may extend it meanwhile
    events: list[Event] = field(default_factory=list)


def _text_of(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProxyError(400, f"{where}: only text content parts are supported")
            out.append(part["text"])
        return "".join(out)
    raise ProxyError(400, f"{where}: content must be a string, null or a list of text parts")


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The request's ``tools``: None, or a list of ``{"type": "function", "function": {"name",
    "description"?, "parameters"?}}``; a 400 naming the first field that is not."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise ProxyError(400, "tools: must be a list of tool schemas")
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ProxyError(400, f"{where}: must be an object")
        if t.get("type", "function") != "function":
            raise ProxyError(400, f"{where}.type: only function tools are supported")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ProxyError(400, f'{where}.function: required, an object {{"name": ..., "parameters": {{...}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ProxyError(400, f"{where}.function.name: must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ProxyError(400, f"{where}.function.description: must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ProxyError(400, f"{where}.function.parameters: must be a JSON schema object")
    return tools


def _completion_cap(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` and ``max_tokens`` alike: a positive integer each, the smaller wins."""
    caps = []
    for key in ("max_completion_tokens", "max_tokens"):
        cap = body.get(key)
        if cap is None:
            continue
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ProxyError(400, f"{key}: must be a positive integer")
        caps.append(cap)
    return min(caps) if caps else None


def _conversation(body: dict[str, Any], header: str | None) -> str | None:
    """The conversation a call names (module docstring), from the body or the header."""
    named = body.get(CONVERSATION_FIELD)
    if named is not None and (not isinstance(named, str) or not 0 < len(named) <= 128):
        raise ProxyError(400, f"{CONVERSATION_FIELD}: must be a string of 1 to 128 characters")
    if header is not None and (not header or len(header) > 128):
        raise ProxyError(400, f"{CONVERSATION_HEADER}: must be 1 to 128 characters")
    if named is not None and header is not None and named != header:
        raise ProxyError(400, f"{CONVERSATION_FIELD} ({named!r}) and the {CONVERSATION_HEADER} header "
                         f"({header!r}) name different conversations")
    return named if named is not None else header


def _decode_arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
    return raw


def assistant_key(content: str, calls: list[tuple[str, Any]]) -> str:
    """What identifies an assistant message across a harness's re-serialisation."""
    return json.dumps([content.strip(), [[n, a] for n, a in calls]], sort_keys=True, ensure_ascii=False)


def _canon(m: dict[str, Any]) -> tuple[str, str]:
    return (m["role"], m["key"] if m["role"] == "assistant" else m["content"])


class EpisodeProxy:
    """The endpoint of one episode. ``chat_completion`` is the handler (usable without HTTP);
    ``start_unix`` / ``start_tcp`` serve it; ``sub_traces`` returns what was recorded.

    env_step: runs one env tool call for ``/relayrl/v1/env/step`` (gate included) and returns
        (observation, done); None = the endpoint answers 404.
    task: what ``/relayrl/v1/task`` returns (the env's first messages and tools).
    """

    def __init__(self, engine: Engine, chat: ChatFormat, parser: Any, settings: ProxySettings,
                 api_key: str | None = None, env_step: EnvStep | None = None,
                 task: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.chat = chat
        self.parser = parser
        self.settings = settings
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.env_step = env_step
        self.task = task or {}
        self.traces: list[_Trace] = []
        self.calls = 0
        self.env_steps = 0
        self.generated_tokens = 0
        self.refused_calls = 0  # calls refused at a cap (context, max_calls, max_sub_traces)
        self.done = False
        self.error: BaseException | None = None  # an engine/env failure that fails the episode
        self.seconds_in_engine = 0.0
        self._returned: dict[str, list[str]] = {}  # assistant key -> sampled texts
        self._refused: dict[str, str] = {}  # conversation -> the cap its last call was refused at
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ messages

    def _internal(self, messages: Any) -> list[dict[str, Any]]:
        """OpenAI messages -> canonical ``{"role", "content"[, "key"]}`` dicts (role ``tool``
        becomes the chat format's observation role; an assistant message gets its key)."""
        if not isinstance(messages, list) or not messages:
            raise ProxyError(400, "messages: must be a non-empty list")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ProxyError(400, f"{where}: must be an object with a string role")
            role = m["role"]
            text = _text_of(m.get("content"), where)
            if role in ("system", "developer", "user"):
                out.append({"role": "system" if role == "developer" else role, "content": text})
            elif role in ("tool", "function"):
                out.append({"role": self.chat.observation_role, "content": text})
            elif role == "assistant":
                calls = []
                raw_calls = m.get("tool_calls")
                if raw_calls is not None and not isinstance(raw_calls, list):
                    raise ProxyError(400, f"{where}.tool_calls: must be a list of tool calls")
                for j, c in enumerate(raw_calls or []):
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise ProxyError(400, f"{where}.tool_calls[{j}]: needs function.name")
                    calls.append((fn["name"], _decode_arguments(fn.get("arguments", "{}"))))
                key = assistant_key(text, calls)
                sampled = self._returned.get(key)
                content = sampled[-1] if sampled else self._format_foreign(text, calls)
                out.append({"role": "assistant", "content": content, "key": key})
            else:
                raise ProxyError(400, f"{where}: unknown role {role!r}")
        if out[-1]["role"] == "assistant":
            raise ProxyError(400, "messages: the last message is the assistant's; prefilled replies are not supported")
        return out

    @staticmethod
    def _format_foreign(text: str, calls: list[tuple[str, Any]]) -> str:
        """An assistant message the proxy did not sample (the harness wrote it): its tool calls
        in Hermes form after its text. It is prompt wherever it appears."""
        parts = [text] if text else []
        parts += [f"<tool_call>{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}</tool_call>" for n, a in calls]
        return "\n".join(parts)

    def _rendered(self, m: dict[str, Any]) -> dict[str, str]:
        return {"role": m["role"], "content": m["content"]}

    def _extends(self, messages: list[dict[str, Any]], tools_key: str,
                 conversation: str | None) -> tuple[_Trace, list[dict[str, Any]]] | None:
        """The served context ``messages`` continues (the longest; of ``conversation`` when the
        call names one), and the new messages."""
        canon = [_canon(m) for m in messages]
        best: tuple[_Trace, list[dict[str, Any]]] | None = None
        for tr in self.traces:
            n = len(tr.messages)
            if tr.busy or tr.tools_key != tools_key or len(messages) <= n:
                continue
            if conversation is not None and tr.conversation != conversation:
                continue
            if canon[:n] == [_canon(m) for m in tr.messages] and (best is None or n > len(best[0].messages)):
                best = (tr, messages[n:])
        return best

    # ------------------------------------------------------------------ the chat endpoint

    async def chat_completion(self, body: Any, conversation: str | None = None) -> dict[str, Any]:
        """One ``/v1/chat/completions`` request -> an OpenAI ``chat.completion`` object.

        conversation: the ``X-Relayrl-Conversation`` header, if any (module docstring)."""
        if not isinstance(body, dict):
            raise ProxyError(400, "the body must be a JSON object")
        if body.get("stream"):
            raise ProxyError(400, "stream: streaming is not supported by the relayrl proxy; send stream=false")
        if body.get("n") not in (None, 1):
            raise ProxyError(400, "n: the relayrl proxy samples one choice per request")
        tools = _check_tools(body.get("tools"))
        tools_key = json.dumps(tools, sort_keys=True)
        cap = _completion_cap(body)
        named = _conversation(body, conversation)
        async with self._lock:  # the bookkeeping of one episode's calls happens in arrival order
            if self.done:
                raise ProxyError(409, "the episode is done (the env said so); the policy takes no more calls",
                                 "episode_done")
            try:
                tr, call_index = self._open(body.get("messages"), tools, tools_key, named)
            except (ValueError, TemplateError) as e:  # the chat template refused these messages
                raise ProxyError(400, f"the chat template cannot render this request: {e}") from None
            budget = min(self.settings.max_new_tokens, self.settings.max_context_tokens - len(tr.ctx.tokens))
            if cap is not None:
                budget = min(budget, cap)
            prompt = list(tr.ctx.tokens)
            tr.busy = True
        sampling = SamplingParams(max_new_tokens=budget, temperature=self.settings.temperature,
                                  top_p=self.settings.top_p, stop_token_ids=self.chat.stop_token_ids,
                                  seed=turn_seed(self.settings.seed, call_index))
        started = time.perf_counter()
        try:
            completion = await self.engine.generate(GenerateRequest(prompt, sampling))
        except EngineError as e:
            self.error = e
            raise ProxyError(502, f"the engine failed: {e}", "engine_error") from None
        finally:
            tr.busy = False
        async with self._lock:
            self.seconds_in_engine += time.perf_counter() - started
            self.generated_tokens += len(completion.output_ids)
            if tr.weight_version is None:
                tr.weight_version = completion.weight_version
            tr.ctx.extend(completion.output_ids, 1, completion.output_logprobs)
            tr.calls += 1
            tr.stopped = completion.finish_reason == "stop"
            text = self.chat.tok.decode(completion.output_ids, skip_special_tokens=True)
            message, calls = self._reply(text, tr, call_index)
            key = assistant_key(message.get("content") or "", calls)
            self._returned.setdefault(key, []).append(text)
            tr.messages.append({"role": "assistant", "content": text, "key": key})
            tr.rendered.append({"role": "assistant", "content": text})
            tr.waiting_since = len(self.traces)
        finish = "tool_calls" if calls else ("stop" if tr.stopped else "length")
        prompt_tokens = len(tr.ctx.tokens) - len(completion.output_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion.output_ids),
                      "total_tokens": len(tr.ctx.tokens)},
            CONVERSATION_FIELD: tr.conversation,
        }

    def _refuse(self, conversation: str, status: int, message: str, code: str) -> ProxyError:
        """A call refused at a cap: the error for it alone; the conversation remembers it (the
        episode is truncated if its main conversation ends here)."""
        self._refused[conversation] = code
        self.refused_calls += 1
        return ProxyError(status, message, code)

    def _open(self, raw_messages: Any, tools: list[dict[str, Any]] | None, tools_key: str,
              named: str | None = None) -> tuple[_Trace, int]:
        """The sub-trace this request continues (its new messages appended) or a new one;
        and the call's index. Raises ProxyError at a cap (for this call alone)."""
        messages = self._internal(raw_messages)
        found = self._extends(messages, tools_key, named)
        if found is not None:
            conversation = found[0].conversation
        elif named is not None:
            conversation = named
        elif not self.traces:
            conversation = MAIN
        else:
            conversation = self._side_name()
        if self.calls >= self.settings.max_calls:
            raise self._refuse(conversation, 400, f"the episode reached blackbox.max_calls={self.settings.max_calls}",
                               "max_calls_exceeded")
        if found is not None:
            tr, new = found
            new_rendered = [self._rendered(m) for m in new]
            ids = self.chat.continuation_ids(tr.rendered, tools, new_rendered, tr.stopped)
            if len(tr.ctx.tokens) + len(ids) >= self.settings.max_context_tokens:
                tr.events.append(Event("refused", self.calls, {"reason": "context"}))
                raise self._refuse(conversation, 400, "the conversation reached rollout.max_context_tokens="
                                   f"{self.settings.max_context_tokens}", "context_length_exceeded")
            self._link_children(tr)
            tr.ctx.extend(ids, 0)
            tr.messages += new
            tr.rendered += new_rendered
        else:
            if len(self.traces) >= self.settings.max_sub_traces:
                raise self._refuse(conversation, 400, "the episode reached blackbox.max_sub_traces="
                                   f"{self.settings.max_sub_traces}", "max_sub_traces_exceeded")
            rendered = [self._rendered(m) for m in messages]
            if tools:
                rendered = self.chat.with_tool_instructions(rendered, tools)
            prompt = self.chat.prompt_ids(rendered, tools)
            if len(prompt) >= self.settings.max_context_tokens:
                raise self._refuse(conversation, 400, f"the prompt ({len(prompt)} tokens) reaches "
                                   f"rollout.max_context_tokens={self.settings.max_context_tokens}",
                                   "context_length_exceeded")
            tr = _Trace(len(self.traces), conversation, tools_key, tools, list(messages), rendered)
            tr.ctx.extend(prompt, 0)
            self.traces.append(tr)
        self._refused.pop(conversation, None)
        self.calls += 1
        return tr, self.calls - 1

    def _reply(self, text: str, tr: _Trace, call_index: int) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        """The assistant message the harness gets: the tool call (if the parser finds one) as
        ``tool_calls``, the rest of the text as ``content``."""
        action = self.parser.parse(text) if tr.tools else None
        if isinstance(action, ToolCall):
            content = text.replace(action.raw, "", 1).strip() if action.raw else text.strip()
            call = {"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
                    "function": {"name": action.name, "arguments": json.dumps(action.arguments, ensure_ascii=False)}}
            return ({"role": "assistant", "content": content or None, "tool_calls": [call]},
                    [(action.name, action.arguments)])
        if isinstance(action, ParseError):
            tr.events.append(Event("parse_error", call_index, {"message": action.message}))
        return {"role": "assistant", "content": text}, []

    def _side_name(self) -> str:
        used = {t.conversation for t in self.traces}
        k = 1
        while f"side-{k}" in used:
            k += 1
        return f"side-{k}"

    @property
    def main_conversation(self) -> str:
        """``main``, or in a harness that names conversations but never ``main``, the first call's."""
        if not self.traces or any(t.conversation == MAIN for t in self.traces):
            return MAIN
        return self.traces[0].conversation

    @property
    def truncation(self) -> str | None:
        """The cap the main conversation's last call was refused at (the episode ended on it:
        ``context_length_exceeded``, ``max_calls_exceeded``, ``max_sub_traces_exceeded``), or None."""
        return self._refused.get(self.main_conversation)

    @property
    def truncated(self) -> bool:
        return self.truncation is not None

    def _link_children(self, tr: _Trace) -> None:
        """``tr`` continues: the side traces opened while it waited (of other conversations),
        still without a parent and not continued since, are its sub-agents, returning here."""
        main = self.main_conversation
        for other in self.traces[tr.waiting_since:]:
            if other.parent < 0 and other.calls > 0 and other.conversation not in (main, tr.conversation):
                other.parent = tr.index
                other.parent_position = len(tr.ctx.tokens)

    # ------------------------------------------------------------------ env tools

    async def step(self, body: Any) -> dict[str, Any]:
        if self.env_step is None:
            raise ProxyError(404, "this episode's env tools are not served by relayrl", "not_found")
        if self.done:
            raise ProxyError(409, "the episode is done; the env takes no more tool calls", "episode_done")
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise ProxyError(400, 'the body must be {"name": TOOL, "arguments": {...}}')
        args = _decode_arguments(body.get("arguments", {}))
        if not isinstance(args, dict):
            raise ProxyError(400, "arguments: must be a JSON object (or a string holding one)")
        self.env_steps += 1
        try:
            observation, done = await self.env_step(ToolCall(body["name"], args, json.dumps(body, ensure_ascii=False)))
        except Exception as e:  # the env failed: the episode fails with it once the agent exits
            self.error = e
            raise ProxyError(500, f"the env failed: {type(e).__name__}: {e}", "env_error") from None
        self.done = self.done or bool(done)
        return {"observation": observation, "done": bool(done)}

    # ------------------------------------------------------------------ results

    def _side_links(self, main: list[_Trace]) -> dict[int, tuple[int, int]]:
        """Side trace index -> (the trace it continues at, the position there): its sub-agent
        parent; else the next trace of its conversation, from its start; else the end of the
        main chain. Where these links would form a loop, the trace that closes it goes to the main
        chain's end instead."""
        end = (main[-1].index, len(main[-1].ctx.tokens))
        links: dict[int, tuple[int, int]] = {}
        for t in self.traces:
            if t.conversation == main[-1].conversation:
                continue
            later = next((u for u in self.traces[t.index + 1:] if u.conversation == t.conversation), None)
            links[t.index] = ((t.parent, t.parent_position) if t.parent >= 0
                              else (later.index, 0) if later is not None else end)
        for i in links:
            seen, j = set(), i
            while j in links and j not in seen:
                seen.add(j)
                j = links[j][0]
            if j in links:  # j closes a loop: cut it there
                links[j] = end
        return links

    def sub_traces(self, trajectory_id: str, reward: float, terminal: bool, **common: Any) -> list[SubTrace]:
        """The recorded sub-traces: side traces first (in the order they were opened), then the
        main chain; the last of the main chain carries ``reward`` (module docstring, Conversations).
        ``common``: domain, group_id, ..."""
        if not self.traces:
            return []
        name = self.main_conversation
        main = [t for t in self.traces if t.conversation == name]
        links = self._side_links(main)
        ordered = [t for t in self.traces if t.conversation != name] + main
        segment_of = {t.index: i for i, t in enumerate(ordered)}
        n = len(ordered)
        return [
            SubTrace(tokens=list(t.ctx.tokens), loss_mask=list(t.ctx.loss_mask), rollout_logprobs=list(t.ctx.logprobs),
                     reward=float(reward) if i == n - 1 else 0.0, trajectory_id=trajectory_id, segment=i,
                     num_segments=n, terminal=terminal and i == n - 1, weight_version=t.weight_version or 0,
                     events=list(t.events), kind="blackbox",
                     parent_segment=segment_of[links[t.index][0]] if t.index in links else -1,
                     parent_position=links[t.index][1] if t.index in links else -1, **common)
            for i, t in enumerate(ordered)
        ]

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/chat/completions",
                            self._http(lambda body, request: self.chat_completion(
                                body, request.headers.get(CONVERSATION_HEADER))))
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/relayrl/v1/env/step", self._http(lambda body, request: self.step(body)))
        app.router.add_get("/relayrl/v1/task", self._task)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every error in the OpenAI shape: aiohttp's own (404, 405, 413: plain text otherwise)
        and, logged, anything unexpected (a 500)."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            where = f"{request.method} {request.path}"
            message = {404: f"{where}: no such endpoint (the proxy serves {ENDPOINTS})",
                       405: f"{where}: method not allowed (the proxy serves {ENDPOINTS})"}.get(
                           e.status, f"{where}: {e.reason}")
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
                e.status, "invalid_request_error")
            response = ProxyError(e.status, message, code).response()
            if "Allow" in e.headers:
                response.headers["Allow"] = e.headers["Allow"]
            return response
        except Exception as e:
            log.exception("black-box proxy: %s %s failed", request.method, request.path)
            return ProxyError(500, f"the relayrl proxy failed: {type(e).__name__}: {e}", "internal_error").response()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return ProxyError(401, "a missing or wrong API key (use this episode's OPENAI_API_KEY)",
                              "invalid_api_key").response()
        return await handler(request)

    def _http(self, fn: Callable[[Any, web.Request], Awaitable[dict[str, Any]]]):
        """A JSON endpoint: ``fn(body, request)``; malformed input is a 400 in the OpenAI shape.
        JSON nested past Python's recursion limit raises RecursionError (not ValueError) in the
        decoder and wherever the body is walked, so it is caught on both sides."""
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except RecursionError:
                return ProxyError(400, "the body is JSON nested too deeply").response()
            except ValueError as e:
                return ProxyError(400, f"the body is not JSON: {e}").response()
            try:
                return web.json_response(await fn(body, request))
            except ProxyError as e:
                return e.response()
            except RecursionError:
                return ProxyError(400, "the request holds JSON nested too deeply").response()
        return handler

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "relayrl"}]})

    async def _task(self, request: web.Request) -> web.Response:
        return web.json_response(self.task)

    async def start_unix(self, path: str, uid: int | None = None) -> None:
        """Serve on a Unix socket at ``path`` (made connectable only by ``uid`` when given)."""
        if len(os.fsencode(path)) > 100:
            raise ValueError(f"{path}: too long for a Unix socket path (over 100 bytes); use a shorter sandbox root")
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()
        if uid is not None:
            os.chown(path, uid, uid)
            os.chmod(path, 0o600)
        else:
            os.chmod(path, 0o660)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on TCP; returns the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
