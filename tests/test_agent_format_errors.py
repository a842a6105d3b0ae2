"""Format errors through the agent loop, on a real sandbox: in an env that requires an action
(the coding env, whose final answer is ``submit``), a reply without a tool call is an error
observation the agent reads and recovers from, not a silent end that scores the untouched stub;
in an env without that attribute it still ends the episode. ``format_errors`` counts them.

The policy is scripted (an ``Engine`` that writes fixed replies, token by token through the
real SmolLM2 tokenizer): what is under test is the loop, the parser, the env and the prompt."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from relayrl.envs.coding import CodingEnv
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.engine import Completion, GenerateRequest
from relayrl.rollout.parsers import HermesParser, MarkdownParser

SOLUTION = "def add(a, b):\n    return a + b\n"
TASK = {
    "id": "add",
    "instruction": "Implement add(a, b) in calc.py: return a + b for ints and floats.",
    "files": [{"path": "calc.py", "content": "def add(a, b):\n    raise NotImplementedError\n"}],
    "visible_tests": [{"path": "tests/test_calc.py",
                       "content": "from calc import add\n\ndef test_small():\n    assert add(1, 2) == 3\n"}],
    "hidden_tests": [{"path": "test_calc_hidden.py", "content":
                      "from calc import add\n\ndef test_int():\n    assert add(2, 3) == 5\n\n"
                      "def test_float():\n    assert add(0.5, 0.25) == 0.75\n"}],
}
# What SmolLM2-135M-Instruct answers: prose and a markdown code block, no tool call.
PROSE = f"Sure! Here is the function:\n```python\n{SOLUTION}```\nThis returns the sum."
HERMES_WRITE = ('<tool_call>{"name": "write_file", "arguments": {"path": "calc.py", '
                '"content": "def add(a, b):\\n    return a + b\\n"}}</tool_call>')
HERMES_SUBMIT = '<tool_call>{"name": "submit", "arguments": {}}</tool_call>'


class ScriptedPolicy:
    """Writes ``replies[turn]``, the turn read from the context as in ``test_antihack_e2e``."""

    def __init__(self, tok, chat: ChatFormat, replies: list[str]):
        self.tok, self.stop, self.replies = tok, chat.stop_token_ids[0], replies

    async def generate(self, request: GenerateRequest) -> Completion:
        turn = self.tok.decode(request.input_ids).count("<|im_start|>assistant") - 1
        ids = self.tok.encode(self.replies[turn], add_special_tokens=False) + [self.stop]
        return Completion(ids, [0.0] * len(ids), "stop")


class AnswerEndsEpisode(CodingEnv):
    """The coding env as a user env that never declared ``requires_action``."""

    requires_action = False


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def play(tok, parser, replies, env_cls=CodingEnv):
    chat = ChatFormat(tok, parser)
    limits = AgentLimits(max_turns=len(replies), max_new_tokens=256, max_context_tokens=8192)
    env = env_cls()

    async def go():
        try:
            return await run_episode(EpisodeJob(TASK, 0, seed=0), env, ScriptedPolicy(tok, chat, replies), chat,
                                     parser, limits)
        finally:
            await env.close()

    traj = asyncio.run(go())
    text = tok.decode(traj.sub_traces[0].tokens)
    observations = [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>tool\n")[1:]]
    return traj, text, observations


def test_hermes_reply_without_a_tool_call_is_a_format_error_and_the_agent_recovers(tok):
    traj, _, obs = play(tok, HermesParser(), [PROSE, HERMES_WRITE, HERMES_SUBMIT])
    assert obs[0] == "error: " + HermesParser().no_action_message()
    assert obs[0].startswith("error: no tool call found.")
    assert obs[1] == f"wrote {len(SOLUTION)} bytes to calc.py"
    assert traj.reward == 1.0 and traj.sub_traces[-1].terminal
    assert traj.metrics["format_errors"] == 1.0 and traj.metrics["turns"] == 3.0
    (event,) = [e for s in traj.sub_traces for e in s.events if e.kind == "parse_error"]
    assert event.turn == 0 and event.data == {"message": HermesParser().no_action_message(), "no_action": True}


def test_without_requires_action_a_plain_answer_still_ends_the_episode(tok):
    traj, _, obs = play(tok, HermesParser(), [PROSE, HERMES_WRITE, HERMES_SUBMIT], env_cls=AnswerEndsEpisode)
    assert obs == [] and traj.metrics["turns"] == 1.0 and traj.sub_traces[-1].terminal
    assert traj.reward == 0.0 and traj.metrics["format_errors"] == 0.0


def test_parse_errors_count_as_format_errors_too(tok):
    broken = '<tool_call>{"name": "submit", "arguments": {}}'  # never closed
    traj, _, obs = play(tok, HermesParser(), [broken, PROSE, HERMES_SUBMIT])
    assert obs[0] == "error: the tool call is not closed with </tool_call>"
    assert obs[1].startswith("error: no tool call found.")
    assert traj.metrics["format_errors"] == 2.0 and traj.reward == 0.0
    assert [e.data["no_action"] for s in traj.sub_traces for e in s.events if e.kind == "parse_error"] == [False, True]


def test_markdown_episode_prompt_error_write_submit(tok):
    fixed = f"Writing it to the file.\n```python calc.py\n{SOLUTION}```"
    traj, text, obs = play(tok, MarkdownParser(), [PROSE, fixed, "```bash\nsubmit\n```"])
    # The system message teaches the markdown format, and only it.
    system = text.split("<|im_end|>")[0]
    assert "```bash\nsubmit\n```" in system and "<tool_call>" not in system and '"type": "function"' not in system
    assert obs[0].startswith("error: the ```python block has no file path, so nothing ran.")
    assert obs[1] == f"wrote {len(SOLUTION)} bytes to calc.py"
    assert traj.reward == 1.0 and traj.sub_traces[-1].terminal and traj.metrics["env/submitted"] == 1.0
    assert traj.metrics["format_errors"] == 1.0
