"""Tool-call parsing never raises; multi-turn formatting is token-exact."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from relayrl.model import make_tiny_tokenizer
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.parsers import HermesParser, PlainParser
from relayrl.types import ParseError, ToolCall




def test_hermes_parses_a_call_with_dict_or_string_arguments():
    p = HermesParser()
    call = p.parse('thinking <tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call> tail')
    assert call == ToolCall("bash", {"cmd": "ls"}, '<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call>')
    call = p.parse('<tool_call>{"name": "bash", "arguments": "{\\"cmd\\": \\"pwd\\"}"}</tool_call>')
    assert isinstance(call, ToolCall) and call.arguments == {"cmd": "pwd"}


def test_hermes_takes_the_first_of_several_calls():
    p = HermesParser()
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    call = p.parse(text)
    assert isinstance(call, ToolCall) and call.name == "a"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('<tool_call>{"name": "bash", "arguments": {}', "not closed"),
        ("<tool_call>{name: bash}</tool_call>", "not valid JSON"),
        ('<tool_call>["bash"]</tool_call>', 'string "name"'),
        ('<tool_call>{"name": "bash", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "bash", "arguments": "{oops"}</tool_call>', "not valid JSON"),
        ("<tool_call>\udcff</tool_call>", "not valid JSON"),
    ],
)
def test_hermes_malformed_calls_become_parse_errors(text, fragment):
    out = HermesParser().parse(text)
    assert isinstance(out, ParseError)
    assert fragment in out.message


def test_no_tool_call_is_none_and_plain_wraps_everything():
    assert HermesParser().parse("just an answer") is None
    assert PlainParser().parse(" w1 w2 \n") == ToolCall("answer", {"text": "w1 w2"}, " w1 w2 \n")


def _roundtrip(tok, parser, generated_text_ids, stopped):
    chat = ChatFormat(tok, parser)
    messages = [{"role": "system", "content": "repeat the word"}, {"role": "user", "content": "say w1"}]
    ids = chat.prompt_ids(messages, None)
    ids += generated_text_ids
    text = tok.decode(generated_text_ids, skip_special_tokens=True)
    messages.append({"role": "assistant", "content": text})
    ids += chat.continuation_ids(messages, None, "say w2", stopped)
    messages.append({"role": "tool", "content": "say w2"})
    expected = tok(chat.render(messages, None, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return ids, list(expected)


def test_continuation_matches_full_render_tiny_tokenizer():
    tok = make_tiny_tokenizer(["say", "repeat", "the", "word", "w1", "w2"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    w1 = tok.convert_tokens_to_ids("w1")
    # Stopped at <|im_end|>: the template's closing must not be repeated.
    ids, expected = _roundtrip(tok, PlainParser(), [w1, im_end], stopped=True)
    assert ids == expected
    # Cut by the length cap: the closing <|im_end|> is added as scaffolding.
    ids, expected = _roundtrip(tok, PlainParser(), [w1], stopped=False)
    assert ids == expected


def test_continuation_matches_full_render_smollm2(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    gen = tok("Sure, w1", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids, expected = _roundtrip(tok, HermesParser(), gen, stopped=True)
    assert ids == expected


def test_tool_instructions_go_into_the_system_message_when_template_ignores_tools():
    tok = make_tiny_tokenizer(["w1"])
    chat = ChatFormat(tok, HermesParser())
    tools = [{"type": "function", "function": {"name": "answer", "parameters": {}}}]
    msgs = chat.with_tool_instructions([{"role": "system", "content": "hi"}], tools)
    assert msgs[0]["content"].startswith("hi\n\n")
    assert '"name": "answer"' in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
