"""Token-exact chat formatting for multi-turn episodes.

The tokens the policy sampled are never re-tokenised: a trajectory is the first prompt's ids,
then, turn by turn, the engine's output ids followed by the ids of the text the chat template
puts between that turn and the next generation (the end of the assistant turn if generation
stopped at a length cap, the observation message, the next generation prompt). That text is
found by rendering the conversation with and without the new messages and taking the
difference, so any template that renders earlier turns unchanged works.

How the model learns the tool-call format: a parser whose format is the JSON call the schemas
describe (``hermes``) lets the template render the tools' schemas and adds its own text
instructions only when the template ignores them; a parser with another format (``markdown``,
``renders_tool_schemas = False``) keeps the schemas out of the template altogether and always
puts its own instructions in the system message, so the prompt never teaches two formats.
"""

from __future__ import annotations

from typing import Any

from .parsers import renders_tool_schemas


class TemplateError(RuntimeError):
    pass


class ChatFormat:
    def __init__(self, tokenizer: Any, parser: Any = None, observation_role: str = "tool") -> None:
        self.tok = tokenizer
        self.parser = parser
        self.observation_role = observation_role
        self.template_tools = parser is None or renders_tool_schemas(parser)
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError("the tokenizer has no chat template; relayrl needs one to format turns")
        self.stop_token_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    def render(self, messages: list[dict[str, str]], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        """The template's text; ``tools`` reach the template only if the parser renders tool schemas."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools and self.template_tools:
            kwargs["tools"] = tools
        return self.tok.apply_chat_template(messages, **kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def with_tool_instructions(self, messages: list[dict[str, str]], tools: list[dict]) -> list[dict[str, str]]:
        """If the template does not render ``tools`` (it ignores them, or the parser keeps them from
        it), put the parser's tool instructions in the system message."""
        if not tools or self.parser is None:
            return messages
        if self.render(messages, tools, False) != self.render(messages, None, False):
            return messages  # the template renders the schemas itself
        instructions = self.parser.format_tools(tools)
        if not instructions:
            return messages
        out = [dict(m) for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + instructions
        else:
            out.insert(0, {"role": "system", "content": instructions})
        return out

    def prompt_ids(self, messages: list[dict[str, str]], tools: list[dict] | None) -> list[int]:
        return self.encode(self.render(messages, tools, add_generation_prompt=True))

    def continuation_ids(
        self,
        messages: list[dict[str, str]],
        tools: list[dict] | None,
        observation: str | list[dict[str, str]],
        stopped: bool,
    ) -> list[int]:
        """Ids between the last assistant turn (the last of ``messages``) and the next generation.

        observation: the observation text (one message of ``observation_role``), or the new
            messages themselves (an observation then a user request, for compaction).
        stopped: generation ended with a stop token, which already closes the turn.
        """
        new = [{"role": self.observation_role, "content": observation}] if isinstance(observation, str) else observation
        before = self.render(messages, tools, add_generation_prompt=False)
        after_msgs = messages + new
        after = self.render(after_msgs, tools, add_generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError(
                "the chat template renders earlier turns differently once a turn is added; "
                "token-exact multi-turn rollouts need a prefix-stable template"
            )
        # ``before`` = (conversation up to the generation prompt) + content + turn closing.
        content = messages[-1]["content"]
        head = self.render(messages[:-1], tools, add_generation_prompt=True)
        body = before[len(head):] if before.startswith(head) else None
        if body is None or not body.startswith(content):
            raise TemplateError("the chat template does not render the assistant turn after its generation prompt")
        closing = body[len(content):]
        if stopped:
            for sid in self.stop_token_ids:
                stop_text = self.tok.convert_ids_to_tokens(sid)
                if isinstance(stop_text, str) and closing.startswith(stop_text):
                    closing = closing[len(stop_text):]
                    break
        return self.encode(closing + after[len(before):])
