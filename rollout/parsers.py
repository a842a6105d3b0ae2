"""Tool-call parsers: model text -> ``ToolCall`` | ``ParseError`` | None.

A parser never raises on model output. ``None`` means the model wrote no tool call (a plain
answer, which ends the episode unless the env declares ``requires_action``: then it is a format
error, worded by the parser's ``no_action_message``); ``ParseError`` means it tried and failed,
which becomes an error observation so the agent can correct itself.

Formats:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; the chat template
  renders the tool schemas when it can (``renders_tool_schemas = True``).
- ``markdown``: the mini-swe-agent / SWE-agent convention of fenced blocks; the parser's own
  text instructions always go in the system prompt (``renders_tool_schemas = False``).
- ``plain``: the whole reply is the ``answer`` tool's text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

from relayrl.fences import Fence, fenced_blocks
from relayrl.registry import parsers
from relayrl.types import ParseError, ToolCall


class ToolCallParser(Protocol):
    """The parser seam. Two optional attributes (read with defaults by ``renders_tool_schemas``
    and ``no_action_message`` below, so parsers written before them keep working):

    renders_tool_schemas: True (default) = the chat template gets the tools' JSON schemas when it
        renders them, and ``format_tools`` is used only for templates that ignore them; False =
        the template never gets them and ``format_tools`` always goes in the system prompt (for
        formats other than the JSON calls the schemas suggest).
    no_action_message(): the error observation for a reply without a tool call in an env that
        requires one.
    """

    def parse(self, text: str) -> ToolCall | ParseError | None: ...

    def format_tools(self, tools: list[dict]) -> str:
        """The instructions telling the model how to call ``tools`` (for templates without tools)."""
        ...


def renders_tool_schemas(parser: Any) -> bool:
    """Whether the chat template should get the tools' schemas (see ``ToolCallParser``)."""
    return bool(getattr(parser, "renders_tool_schemas", True))


def no_action_message(parser: Any) -> str:
    """The format error for a reply without a tool call (see ``ToolCallParser``)."""
    own = getattr(parser, "no_action_message", None)
    return own() if own is not None else "no tool call found; every reply must call one tool"


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@parsers.register("hermes")
class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes / Qwen style).

    Only the first call in a turn is executed; the agent loop sees one action per turn.
    """

    renders_tool_schemas = True

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

    def no_action_message(self) -> str:
        return ('no tool call found. Every reply must call one tool, written as '
                '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>')


@parsers.register("plain")
class PlainParser:
    """The whole reply is the argument of a single ``answer`` tool (for toy envs and tiny models)."""

    tool_name = "answer"
    renders_tool_schemas = True

    def parse(self, text: str) -> ToolCall | ParseError | None:
        return ToolCall(name=self.tool_name, arguments={"text": text.strip()}, raw=text)

    def format_tools(self, tools: list[dict]) -> str:
        return ""

    def no_action_message(self) -> str:
        return "no answer found; reply with your answer"  # never needed: every reply is one


_SHELLS = ("bash", "sh", "shell")
_PATH_KEYS = ("path=", "file=")
_READ_WITH_BASH = {
    "read_file": "To read a file, run `cat PATH` in a bash block.",
    "run_tests": "To run the tests, run `python -m pytest -q tests` in a bash block.",
}


@parsers.register("markdown")
class MarkdownParser:
    """Fenced blocks, the mini-swe-agent / SWE-agent convention, as a user (or model) writes them::

        ```bash
        python -m pytest -q tests
        ```                         -> bash(command="python -m pytest -q tests")

        ```python solution.py
        def add(a, b): ...
        ```                         -> write_file(path="solution.py", content=<the block>)

        ```bash
        submit
        ```                         -> submit()

    A path is the info string's second word (```` ```python solution.py ````); ``path=X`` or
    ``file=X`` anywhere in it (```` ```python path=solution.py ````) and a lone word with a dot or
    a slash (```` ```solution.py ````) work too. A block with a path writes that file, whatever its
    language; a ``bash``/``sh``/``shell`` block without one runs as a command; other blocks (a
    ```` ```python ```` snippet without a path, ```` ```text ````) are not actions and are skipped.
    Only the first action block of a reply runs.

    A reply without an action block is a ``ParseError`` whose message tells the model what to
    write instead, never None: in this format, the final answer is the ``submit`` block.

    A block left open at the end of the reply still runs if it has content. Small models often
    end a reply right after the code, without the closing fence, and running what they wrote
    lets them see the result (a cut-off file shows up as a failing test); an open block with
    nothing in it is a ``ParseError``.

    The chat template never gets the tools' JSON schemas (they describe JSON calls, not this
    format): ``format_tools`` always goes in the system prompt.
    """

    renders_tool_schemas = False

    def parse(self, text: str) -> ToolCall | ParseError | None:
        pathless: Fence | None = None
        for block in fenced_blocks(text):
            path = _block_path(block)
            if path is None and block.language not in _SHELLS:
                if pathless is None and block.body.strip():
                    pathless = block
                continue
            return self._action(block, path)
        if pathless is not None:
            fence = "```" + pathless.language
            return ParseError(
                f"the {fence} block has no file path, so nothing ran. To write a file, put its path after "
                f"the language (```{pathless.language or 'python'} solution.py); to run a command, use a "
                "```bash block.",
                raw=pathless.raw)
        return ParseError(self.no_action_message())

    def _action(self, block: Fence, path: str | None) -> ToolCall | ParseError:
        if not block.closed and not block.body.strip():
            return ParseError("the ``` block is empty and not closed; close each block with a line of ```",
                              raw=block.raw)
        if path is not None:
            return ToolCall("write_file", {"path": path, "content": block.body}, raw=block.raw)
        command = block.body.strip()
        if not command:
            return ParseError("the bash block is empty; put the command line inside it", raw=block.raw)
        if command == "submit":
            return ToolCall("submit", {}, raw=block.raw)
        return ToolCall("bash", {"command": command}, raw=block.raw)

    def format_tools(self, tools: list[dict]) -> str:
        names = [_tool_name(t) for t in tools]
        if not names:
            return ""
        parts = []
        if "bash" in names:
            parts.append("To run a shell command in the workspace, write a bash block; its exit code and output "
                         "come back in the next message:\n```bash\nls\n```")
            parts += [_READ_WITH_BASH[n] for n in names if n in _READ_WITH_BASH]
        if "write_file" in names:
            parts.append("To create or overwrite a file, put its path after the language and the whole new "
                         "content inside:\n```python solution.py\ndef add(a, b):\n    return a + b\n```")
        if "submit" in names:
            parts.append("When the task is done, write a bash block holding only the word submit:\n"
                         "```bash\nsubmit\n```")
        expressed = {"bash", "write_file", "submit"} | (set(_READ_WITH_BASH) if "bash" in names else set())
        other = [n for n in names if n not in expressed]
        if other:
            parts.append("These tools cannot be called in this format: " + ", ".join(other) + ".")
        if len(other) < len(names):
            parts.insert(0, "Act by writing one fenced code block per reply; only the first block runs. "
                            "You may write a short thought before it.")
        return "\n\n".join(parts)

    def no_action_message(self) -> str:
        return ("no action block found. Write one fenced block per reply, e.g.\n```bash\nls\n```\n"
                "To write a file, put its path after the language: ```python solution.py. "
                "When done, write a bash block holding only: submit")


def _block_path(block: Fence) -> str | None:
    """The file path a block's info string names, or None (see ``MarkdownParser``)."""
    words = block.info.split()
    for word in words:
        if word.startswith(_PATH_KEYS):
            return word.split("=", 1)[1].strip("'\"") or None
    if len(words) >= 2 and "=" not in words[1]:
        return words[1]
    if len(words) == 1 and ("." in words[0] or "/" in words[0]):
        return words[0]
    return None


def _tool_name(schema: dict) -> str:
    function = schema.get("function", schema) if isinstance(schema, dict) else {}
    return str(function.get("name", "?")) if isinstance(function, dict) else "?"
