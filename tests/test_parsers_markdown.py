"""The ``markdown`` parser (fenced blocks, the mini-swe-agent / SWE-agent convention), the fence
reader under it, and how ``ChatFormat`` gives its instructions to the model."""

from __future__ import annotations

import pytest

from relayrl.envs.coding import TOOLS
from relayrl.fences import fenced_blocks
from relayrl.model import make_tiny_tokenizer
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.parsers import HermesParser, MarkdownParser
from relayrl.types import ParseError, ToolCall

P = MarkdownParser()
CODING_TOOLS = [t.schema() for t in TOOLS.values()]


def test_a_bash_block_is_the_bash_tool():
    text = "Let me look around.\n```bash\nls -la\n```\n"
    assert P.parse(text) == ToolCall("bash", {"command": "ls -la"}, "```bash\nls -la\n```")
    assert P.parse("```sh\npython -m pytest -q tests\n```").arguments == {"command": "python -m pytest -q tests"}
    assert P.parse("```shell\ncat a.py\n```").name == "bash"
    assert P.parse("~~~bash\npwd\n~~~").arguments == {"command": "pwd"}


@pytest.mark.parametrize("info", ["python solution.py", "python path=solution.py", "py file=solution.py",
                                  "solution.py", "python path='solution.py'"])
def test_a_block_with_a_path_writes_that_file(info):
    text = f"Here is the fix:\n```{info}\ndef add(a, b):\n    return a + b\n```\nDone."
    call = P.parse(text)
    assert call == ToolCall("write_file", {"path": "solution.py", "content": "def add(a, b):\n    return a + b\n"},
                            f"```{info}\ndef add(a, b):\n    return a + b\n```")


def test_a_path_wins_over_the_language_and_indentation_is_the_fences():
    # A bash block with a path is a file (a script), not a command.
    assert P.parse("```bash run.sh\necho hi\n```") == \
        ToolCall("write_file", {"path": "run.sh", "content": "echo hi\n"}, "```bash run.sh\necho hi\n```")
    # Inside a list item: the fence's two spaces come off every line, deeper indentation stays.
    call = P.parse("1. write it:\n  ```python pkg/mod.py\n  def f():\n      return 1\n  ```")
    assert call.arguments == {"path": "pkg/mod.py", "content": "def f():\n    return 1\n"}


def test_submit_is_a_bash_block_holding_only_submit():
    assert P.parse("All tests pass.\n```bash\nsubmit\n```") == ToolCall("submit", {}, "```bash\nsubmit\n```")
    assert P.parse("```bash\n  submit  \n```").name == "submit"
    # submit with anything else is a command (the env's bash says so), not the final answer.
    assert P.parse("```bash\nsubmit now\n```") == ToolCall("bash", {"command": "submit now"}, "```bash\nsubmit now\n```")


def test_only_the_first_action_block_runs():
    text = "```bash\nls\n```\nthen\n```python a.py\nx = 1\n```\n```bash\nsubmit\n```"
    assert P.parse(text).arguments == {"command": "ls"}
    # A path-less snippet before the action is not an action: it is skipped.
    assert P.parse("e.g.\n```python\nx = 1\n```\nso:\n```bash\npwd\n```").arguments == {"command": "pwd"}


def test_no_action_block_is_a_format_error_never_none():
    out = P.parse("I would sort the list and return it.")
    assert isinstance(out, ParseError) and out.message == P.no_action_message()
    assert "```bash\nls\n```" in out.message and "submit" in out.message
    # The measured SmolLM2 answer: prose and a python block without a path.
    out = P.parse("Sure! Here is the code:\n```python\ndef rle_encode(s):\n    return s\n```\nHope it helps.")
    assert isinstance(out, ParseError)
    assert out.message.startswith("the ```python block has no file path, so nothing ran")
    assert "```python solution.py" in out.message and out.raw.startswith("```python\ndef rle_encode")
    assert isinstance(P.parse(""), ParseError) and isinstance(P.parse("```text\nhello\n```"), ParseError)


def test_an_unclosed_block_runs_if_it_has_content():
    # Generation stopped right after the code: the block still runs.
    assert P.parse("```bash\nls -la\n") == ToolCall("bash", {"command": "ls -la"}, "```bash\nls -la\n")
    call = P.parse("```python solution.py\ndef f():\n    return 1")
    assert call.arguments == {"path": "solution.py", "content": "def f():\n    return 1\n"}
    # Open and empty: a format error that says so.
    for text in ("```bash", "```bash\n", "```python solution.py\n  \n"):
        out = P.parse(text)
        assert isinstance(out, ParseError) and "not closed" in out.message
    out = P.parse("```bash\n\n```")
    assert isinstance(out, ParseError) and "empty" in out.message


def test_fences_follow_commonmark_where_it_matters():
    (b,) = fenced_blocks("````python a.py\n```\ninner\n```\n````")  # a longer fence holds a shorter one
    assert b.body == "```\ninner\n```\n" and b.closed and b.language == "python"
    assert fenced_blocks("run ```ls``` now") == []  # inline code, not a fence
    (b,) = fenced_blocks("~~~\n```\n~~~")  # a backtick line does not close a tilde fence
    assert b.body == "```\n" and b.closed
    (b,) = fenced_blocks("```\nx\n")
    assert not b.closed and b.body == "x\n" and b.raw == "```\nx\n"


def test_format_tools_names_exactly_the_tools_given():
    text = P.format_tools(CODING_TOOLS)
    for fragment in ("```bash\nls\n```", "```python solution.py", "`cat PATH`", "python -m pytest -q tests",
                     "```bash\nsubmit\n```"):
        assert fragment in text
    assert "cannot be called" not in text and "<tool_call>" not in text
    only_bash = P.format_tools([TOOLS["bash"].schema()])
    assert "```bash\nls\n```" in only_bash and "submit" not in only_bash and "solution.py" not in only_bash
    # read_file needs bash to be expressed; alone it cannot be.
    no_bash = P.format_tools([TOOLS["write_file"].schema(), TOOLS["read_file"].schema()])
    assert "```python solution.py" in no_bash and "cannot be called in this format: read_file." in no_bash
    assert "cat PATH" not in no_bash
    assert P.format_tools([]) == ""
    answer = P.format_tools([{"type": "function", "function": {"name": "answer"}}])
    assert answer == "These tools cannot be called in this format: answer."


# A template that renders tool schemas (as Qwen's and Llama 3's do), on the tiny tokenizer.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture()
def tools_tok():
    tok = make_tiny_tokenizer(["w1"])
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def test_markdown_instructions_always_go_in_the_system_message(tools_tok):
    chat = ChatFormat(tools_tok, MarkdownParser())
    messages = chat.with_tool_instructions([{"role": "system", "content": "hi"}], CODING_TOOLS)
    assert messages[0]["content"] == "hi\n\n" + P.format_tools(CODING_TOOLS)
    # ... and the template never gets the schemas, in any render the loop makes.
    rendered = chat.render(messages, CODING_TOOLS, add_generation_prompt=True)
    assert "<|im_start|>tools" not in rendered and "write_file " not in rendered
    assert chat.prompt_ids(messages, CODING_TOOLS) == chat.prompt_ids(messages, None)


def test_hermes_still_lets_a_template_render_the_schemas(tools_tok):
    chat = ChatFormat(tools_tok, HermesParser())
    messages = [{"role": "system", "content": "hi"}]
    assert chat.with_tool_instructions(messages, CODING_TOOLS) == messages
    assert "<|im_start|>tools\nbash read_file write_file run_tests submit" in chat.render(messages, CODING_TOOLS, True)
