"""The tool-call parser seam's contract, run through every registered parser: model output is
untrusted text, so whatever a model writes (nothing, megabytes, broken unicode, fences it never
closed, half a tool call) a parser returns ``ToolCall | ParseError | None`` and never raises;
its instructions are text; the optional attributes the chat format and the loop read have
their documented types."""

from __future__ import annotations

import pytest

import relayrl.envs.toy_delegate  # noqa: F401  (registers its toy parsers)
import relayrl.rollout.parsers  # noqa: F401  (registers the built-in parsers)
from relayrl.envs.coding import CODE_TOOLS, TOOLS
from relayrl.envs.toy import ANSWER_TOOL
from relayrl.registry import parsers
from relayrl.rollout.parsers import no_action_message, renders_tool_schemas
from relayrl.types import ParseError, ToolCall

TEXTS = {
    "empty": "",
    "spaces": " \n\t\r\n ",
    "prose": "I think the answer is to sort the list first.",
    "unicode": "héllo wörld ✓ 中文 עברית 😀 \u200b\u202e",
    "lone surrogate": "```bash\necho \udcff\n```\n<tool_call>\udcff</tool_call>",
    "nul bytes": "\x00```bash\n\x00ls\n```\x00",
    "crlf": "```bash\r\nls -la\r\n```\r\n",
    "unclosed bash": "Let me look.\n```bash\nls -la",
    "unclosed empty": "```bash",
    "unclosed path": "```python solution.py\ndef f():\n    return 1\n",
    "only fences": "```\n```\n```\n~~~\n````",
    "inline fence": "run ```ls``` now",
    "two blocks": "```bash\nls\n```\n```bash\npwd\n```",
    "tilde fence": "~~~bash\nls\n~~~",
    "hermes unclosed": '<tool_call>{"name": "bash", "arguments": {"command": "ls"}',
    "hermes ok": '<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>',
    "hermes in fence": '```json\n<tool_call>{"name": "submit", "arguments": {}}</tool_call>\n```',
    "deep nesting": "(" * 50_000 + "```bash\n" + "[" * 50_000,
    "huge": ("word " * 200_000) + "\n```python big.py\n" + ("x = 1\n" * 100_000),
    "many fences": "```\n" * 20_000,
}

TOOL_LISTS = {
    "none": [],
    "coding": [t.schema() for t in TOOLS.values()],
    "code mode": [t.schema() for t in CODE_TOOLS.values()],
    "toy answer": [ANSWER_TOOL],
    "odd schema": [{"name": "flat_schema"}, {"type": "function", "function": {}}],
}


@pytest.fixture(params=parsers.names())
def parser(request):
    return parsers.resolve(request.param, "rollout.parser")()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_parse_never_raises_and_returns_a_documented_type(parser, name):
    out = parser.parse(TEXTS[name])
    assert out is None or isinstance(out, (ToolCall, ParseError))
    if isinstance(out, ToolCall):
        assert isinstance(out.name, str) and out.name
        assert isinstance(out.arguments, dict) and isinstance(out.raw, str)
    if isinstance(out, ParseError):
        assert isinstance(out.message, str) and out.message.strip()


@pytest.mark.parametrize("name", sorted(TOOL_LISTS))
def test_format_tools_returns_text(parser, name):
    assert isinstance(parser.format_tools(TOOL_LISTS[name]), str)


def test_optional_attributes_have_their_types(parser):
    assert isinstance(renders_tool_schemas(parser), bool)
    message = no_action_message(parser)
    assert isinstance(message, str) and message.strip()


def test_the_built_in_parsers_are_registered():
    assert {"hermes", "markdown", "plain"} <= set(parsers.names())
