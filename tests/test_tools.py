"""Tool-call checking: every malformed call becomes one message, never an exception."""

from __future__ import annotations

import pytest

from relayrl.envs.tools import Param, Tool, check_call
from relayrl.types import ToolCall

TOOLS = {t.name: t for t in (
    Tool("write", "Write a file.", (Param("path", "string", "p"), Param("content", "string", "c"))),
    Tool("seek", "Seek.", (Param("offset", "integer", "o"), Param("verbose", "boolean", "v", required=False))),
    Tool("submit", "Done."),
)}


def test_well_formed_calls_pass():
    assert check_call(ToolCall("write", {"path": "a", "content": "b"}), TOOLS, 100) is None
    assert check_call(ToolCall("seek", {"offset": 3}), TOOLS, 100) is None
    assert check_call(ToolCall("seek", {"offset": 3, "verbose": True}), TOOLS, 100) is None
    assert check_call(ToolCall("submit", {}), TOOLS, 100) is None


@pytest.mark.parametrize("call, message", [
    (ToolCall("nope", {}), "unknown tool 'nope'; the tools are: seek, submit, write"),
    (ToolCall("write", {"path": "a"}), "write: missing argument(s) content"),
    (ToolCall("write", {"path": "a", "content": "b", "mode": "x"}), "write: unexpected argument(s) 'mode'"),
    (ToolCall("write", {"path": 1, "content": "b"}), "write: argument 'path' must be of type string, got integer"),
    (ToolCall("seek", {"offset": True}), "seek: argument 'offset' must be of type integer, got boolean"),
    (ToolCall("seek", {"offset": 1.5}), "seek: argument 'offset' must be of type integer, got number"),
    (ToolCall("seek", {"offset": None}), "seek: argument 'offset' must be of type integer, got null"),
    (ToolCall("write", {"path": "a", "content": "x" * 101}),
     "write: argument 'content' is 101 bytes; the limit is 100. Split the work into smaller calls."),
    # 34 characters, 101 bytes: the limit is on bytes, not characters ("é" is 2 bytes, "€" 3).
    (ToolCall("write", {"path": "a", "content": "€" * 33 + "éé"}),
     "write: argument 'content' is 103 bytes; the limit is 100. Split the work into smaller calls."),
    (ToolCall("write", {"path": "a\udc80", "content": "b"}), "write: argument 'path' is not valid UTF-8 text"),
])
def test_malformed_calls_get_one_message(call, message):
    assert check_call(call, TOOLS, 100) == message


def test_unknown_huge_name_is_cut_in_the_message():
    msg = check_call(ToolCall("x" * 10_000, {}), TOOLS, 100)
    assert msg is not None and len(msg) < 200


def test_schema_is_the_openai_function_shape():
    assert TOOLS["seek"].schema() == {
        "type": "function",
        "function": {
            "name": "seek", "description": "Seek.",
            "parameters": {"type": "object",
                           "properties": {"offset": {"type": "integer", "description": "o"},
                                          "verbose": {"type": "boolean", "description": "v"}},
                           "required": ["offset"]},
        },
    }
