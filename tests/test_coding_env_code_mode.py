"""The coding env's single-turn code mode on a real local sandbox: the reply's code replaces the
task's code file and the hidden tests grade it, as in agent mode."""

from __future__ import annotations

import asyncio

import pytest

from relayrl.envs.coding import CodingEnv, code_file, extract_code
from relayrl.rollout.parsers import PlainParser

TASKS = {t["id"]: t for t in CodingEnv.default_tasks()}
RLE = TASKS["001_run_length_encoding"]
(RLE_SOLUTION,) = [f["content"] for f in RLE["solution"]]


def play(reply_call, task=RLE, **kwargs):
    """Reset in code mode, step one call, score; return (reset, step result, score)."""

    async def go():
        env = CodingEnv(mode="code", **kwargs)
        try:
            reset = await env.reset(task)
            result = await env.step(reply_call)
            return reset, result, await env.score()
        finally:
            await env.close()

    return asyncio.run(go())


def answer(reply: str):
    return PlainParser().parse(reply)  # the pairing: the whole reply is answer(text)


def test_first_message_holds_the_stub_and_asks_for_one_python_block():
    reset, _, _ = play(answer(""))
    assert [t["function"]["name"] for t in reset.tools] == ["answer"]
    user = reset.messages[-1]["content"]
    assert user.startswith(RLE["instruction"].strip())
    assert "The current content of rle.py:\n```python\ndef rle_encode(s: str) -> str:\n    raise NotImplementedError" in user
    assert user.endswith("Reply with the complete new content of rle.py in one fenced ```python block.")
    assert "submit" not in reset.messages[0]["content"] and "tool" not in reset.messages[0]["content"]


def test_the_reference_solution_in_a_python_block_scores_one():
    reply = f"Here is my solution.\n\n```python\n{RLE_SOLUTION}```\n\nIt handles multi-digit runs."
    _, result, score = play(answer(reply))
    assert result.done and result.observation == f"wrote {len(RLE_SOLUTION.encode())} bytes to rle.py"
    assert score.reward == 1.0 and score.details["code_found"] == 1.0
    assert score.details["hidden_passed"] == score.details["hidden_total"] > 0


def test_a_reply_without_code_scores_zero():
    _, result, score = play(answer("I would count the runs and join them. Good luck!"))
    assert result.done and result.observation == "no code found: nothing was written"
    assert score.reward == 0.0 and score.details["code_found"] == 0.0 and score.details["hidden_total"] > 0


def test_the_wrong_function_scores_less_than_one():
    wrong = "def rle_encode(s: str) -> str:\n    return s\n\n\ndef rle_decode(s: str) -> str:\n    return s\n"
    _, _, score = play(answer(f"```python\n{wrong}```"))
    assert score.details["code_found"] == 1.0
    # Identity functions pass encode_empty, round_trip and decode_empty, and fail encode_long_run
    # and decode_multi_digit: 3 of the 5 hidden tests.
    assert score.details["hidden_total"] == 5 and score.reward == pytest.approx(3 / 5, abs=1e-12)


def test_write_file_of_the_code_file_is_accepted_and_other_files_are_not():
    # What reference_calls and a markdown reply naming the file produce.
    (write, _submit) = CodingEnv.reference_calls(RLE)
    _, result, score = play(write)
    assert result.done and score.reward == 1.0 and score.details["code_found"] == 1.0
    other = type(write)("write_file", {"path": "tests/test_rle.py", "content": "def test_x(): pass\n"})
    _, result, score = play(other)
    assert not result.done and result.observation == "error: write_file: code mode writes only rle.py"
    assert score.reward == 0.0 and score.details["code_found"] == 0.0 and score.details["tool_errors"] == 1.0
    _, result, _ = play(type(write)("bash", {"command": "ls"}))
    assert not result.done and result.observation.startswith("error: unknown tool 'bash'")


@pytest.mark.parametrize("reply, code", [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```python rle.py\nx = 1\n```", "x = 1\n"),
    ("```bash\nls\n```\n```python\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),  # the first python block
    ("Sure:\n```python\ndef f():\n    return 1", "def f():\n    return 1\n"),  # left open: counts
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no block, but the reply is code
    ("import math", "import math\n"),
    ("hello", None),  # parses as Python, but only as a bare name
    ("The answer is to count runs.", None),
    ("```text\nnot code\n```", None),
    ("```python\n\n```", None),
    ("", None),
    ("\x00def f(): pass", None),
])
def test_extract_code(reply, code):
    assert extract_code(reply) == code


def test_code_file_is_the_tasks_or_its_only_python_file():
    assert code_file(RLE) == "rle.py"
    assert code_file({**RLE, "code_file": "other.py"}) == "other.py"
    package = TASKS["055_shop_package"]  # three .py files: which one is ambiguous
    with pytest.raises(ValueError, match="needs the task's 'code_file'"):
        code_file(package)
    with pytest.raises(ValueError, match="found: none"):
        code_file({**RLE, "files": [{"path": "README.md", "content": ""}]})


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode must be 'agent' or 'code'"):
        CodingEnv(mode="chat")
