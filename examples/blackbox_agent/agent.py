"""A black-box agent harness: a plain Python program on the ``openai`` client package.

It knows nothing of relayrl. It reads its task (the first messages and the tool schemas) from
the JSON file named by ``$RELAYRL_TASK``, talks to whatever OpenAI-compatible endpoint
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` name, and runs each tool call it gets back by POSTing
it to ``$RELAYRL_ENV_URL/env/step`` (the env's tools, served by relayrl; a harness with tools
of its own would run them itself). It stops when the env says done, when the model answers
without a tool call, or after ``--max-turns``.

``--rewrite-every K`` makes it manage its own context the way long-running harnesses do: after
every K turns it throws its history away and goes on from the system message and the last
tool result, restated as a user message. Every call carries the header
``X-Relayrl-Conversation: main`` (other endpoints ignore it): it tells relayrl that a rewritten
history still continues the agent's main work, so the reward reaches it (without it, relayrl
takes a context that extends no earlier one for a side call, which gets no reward).

    python agent.py [--max-turns N] [--rewrite-every K] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

from openai import OpenAI


def env_step(name: str, arguments: str) -> dict:
    request = urllib.request.Request(
        os.environ["RELAYRL_ENV_URL"].rstrip("/") + "/env/step",
        data=json.dumps({"name": name, "arguments": arguments}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-turns", type=int, default=16)
    parser.add_argument("--rewrite-every", type=int, default=0)
    parser.add_argument("--model", default="policy")
    args = parser.parse_args()

    with open(os.environ["RELAYRL_TASK"], encoding="utf-8") as f:
        task = json.load(f)
    client = OpenAI(max_retries=0, timeout=600, default_headers={"X-Relayrl-Conversation": "main"})
    messages = list(task["messages"])
    tools = task.get("tools") or None
    for turn in range(args.max_turns):
        kwargs = {"tools": tools} if tools else {}
        reply = client.chat.completions.create(model=args.model, messages=messages, **kwargs).choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            print(f"answer: {reply.content}")
            return 0
        done = False
        last = ""
        for call in reply.tool_calls:
            result = env_step(call.function.name, call.function.arguments)
            last = result["observation"]
            messages.append({"role": "tool", "tool_call_id": call.id, "content": last})
            done = done or result["done"]
        if done:
            print(f"done after {turn + 1} turns")
            return 0
        if args.rewrite_every and (turn + 1) % args.rewrite_every == 0:
            system = [m for m in messages[:1] if m["role"] == "system"]
            messages = system + [{"role": "user", "content": last}]
    print(f"stopped after {args.max_turns} turns", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
