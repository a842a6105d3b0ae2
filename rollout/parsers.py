"""Tool-call parsers: model text -> ``ToolCall`` | ``ParseError`` | None.

A parser never raises on model output. ``None`` means the model wrote no tool call (a plain
answer, which ends the episode); ``ParseError`` means it tried and failed, which becomes an
error observation so the agent can correct itself.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from relayrl.registry import parsers
from relayrl.types import ParseError, ToolCall


class ToolCallParser(Protocol):
    def parse(self, text: str) -> ToolCall | ParseError | None: ...

    def format_tools(self, tools: list[dict]) -> str:
        """The instructions telling the model how to call ``tools`` (for templates without tools)."""
        ...


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@parsers.register("hermes")
class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes / Qwen style).

    Only the first call in a turn is executed; the agent loop sees one action per turn.
    """

    def parse(self, text: str) -> ToolCall | ParseError | None:
        m = _HERMES.search(text)
        if m is None:
            return None
        body = m.group(0)
        payload = m.group(1).strip()
        if not body.rstrip().endswith("</tool_call>"):
            return ParseError("the tool call is not closed with </tool_call>", raw=body)
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError as e:
            return ParseError(f"the tool call is not valid JSON ({e.msg} at position {e.pos})", raw=body)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ParseError('the tool call must be a JSON object with a string "name"', raw=body)
        args = obj.get("arguments", {})
        if isinstance(args, str):
            # Some models emit arguments as a JSON-encoded string.
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return ParseError('"arguments" is a string that is not valid JSON', raw=body)
        if not isinstance(args, dict):
            return ParseError('"arguments" must be a JSON object', raw=body)
        return ToolCall(name=obj["name"], arguments=args, raw=body)

    def format_tools(self, tools: list[dict]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You may call tools. Their JSON schemas:\n<tools>\n" + lines + "\n</tools>\n"
            'To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.'
        )


@parsers.register("plain")
class PlainParser:
    """The whole reply is the argument of a single ``answer`` tool (for toy envs and tiny models)."""

    tool_name = "answer"

    def parse(self, text: str) -> ToolCall | ParseError | None:
        return ToolCall(name=self.tool_name, arguments={"text": text.strip()}, raw=text)

    def format_tools(self, tools: list[dict]) -> str:
        return ""
