"""Tools an environment offers the agent: a JSON schema for the prompt and a checked call.

A model's tool call is untrusted input. Before an env runs it, ``check_call`` turns every way it
can be wrong (unknown tool, missing or extra arguments, wrong types, huge values, text that does
not round-trip through UTF-8) into one short error message for the agent, so a bad call becomes
an observation and never an exception out of the agent loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from relayrl.types import ToolCall

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str
    required: bool = True


@dataclass(frozen=True)
class Tool:
    """One tool: its name, what it does, its parameters (flat, JSON-typed)."""

    name: str
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema that chat templates render into the prompt."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {p.name: {"type": p.type, "description": p.description} for p in self.params},
                    "required": [p.name for p in self.params if p.required],
                },
            },
        }


def check_call(call: ToolCall, tools: dict[str, Tool], max_argument_bytes: int) -> str | None:
    """Why ``call`` cannot run (a message for the agent), or None if it is well formed.

    Booleans are not accepted as integers (JSON keeps them apart, Python does not).
    """
    tool = tools.get(call.name)
    if tool is None:
        return f"unknown tool {call.name[:80]!r}; the tools are: {', '.join(sorted(tools))}"
    params = {p.name: p for p in tool.params}
    extra = sorted(set(call.arguments) - set(params))
    if extra:
        return f"{tool.name}: unexpected argument(s) {', '.join(repr(e[:40]) for e in extra)}"
    missing = [p.name for p in tool.params if p.required and p.name not in call.arguments]
    if missing:
        return f"{tool.name}: missing argument(s) {', '.join(missing)}"
    for name, value in call.arguments.items():
        expected = _JSON_TYPES[params[name].type]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            return f"{tool.name}: argument {name!r} must be of type {params[name].type}, got {_json_type(value)}"
        size = _utf8_size(value)
        if size is None:
            return f"{tool.name}: argument {name!r} is not valid UTF-8 text"
        if size > max_argument_bytes:
            return (f"{tool.name}: argument {name!r} is {size} bytes; the limit is {max_argument_bytes}. "
                    "Split the work into smaller calls.")
    return None


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return "null" if value is None else type(value).__name__


def _utf8_size(value: Any) -> int | None:
    """Bytes of ``value`` as UTF-8 JSON text; None if it holds lone surrogates."""
    try:
        if isinstance(value, str):
            return len(value.encode("utf-8"))
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:
        return None
