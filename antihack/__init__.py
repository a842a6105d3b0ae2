"""The anti-hack gate: a high-recall rule stage (``rules``, packs of YAML data in ``packs/``),
a high-precision LLM judge (``judge``) on what the rules flag, dummy outputs for blocked calls
(``gate``). See ``gate.Gate``."""

from __future__ import annotations

from typing import Any

from relayrl.antihack.actions import ToolKinds
from relayrl.antihack.gate import Gate, Verdict
from relayrl.antihack.judge import EngineJudge, Judge, JudgeError, JudgeRequest, JudgeVerdict, OpenAIJudge
from relayrl.antihack.rules import RulePackError, RuleStage, load_pack

__all__ = ["Gate", "Verdict", "Judge", "JudgeError", "JudgeRequest", "JudgeVerdict", "EngineJudge", "OpenAIJudge",
           "RuleStage", "RulePackError", "load_pack", "make_rule_stage", "make_gate"]


def make_rule_stage(cfg: Any) -> RuleStage:
    """The rule stage an ``AntihackConfig`` describes (raises ``RulePackError``)."""
    tools = ToolKinds(shell=dict(cfg.shell_tools), read=dict(cfg.read_tools),
                      write={k: (v[0], v[1]) for k, v in cfg.write_tools.items()},
                      none=frozenset(cfg.harmless_tools))
    return RuleStage([load_pack(p) for p in cfg.rule_packs], cfg.protected_paths, cfg.allowed_hosts, tools)


def make_gate(cfg: Any, engine: Any = None, tokenizer: Any = None) -> Gate:
    """The gate an ``AntihackConfig`` describes. ``engine``/``tokenizer``: the policy's, used by
    the ``policy`` judge kind."""
    rules = make_rule_stage(cfg)
    judge: Judge | None = None
    j = cfg.judge
    if cfg.mode == "judge":
        if j.kind == "policy":
            if engine is None or tokenizer is None:
                raise ValueError("antihack.judge.kind=policy needs the rollout engine and tokenizer")
            judge = EngineJudge(engine, tokenizer, j.max_new_tokens)
        elif j.kind == "engine":
            from transformers import AutoTokenizer

            from relayrl.rollout.client import HttpEngineClient

            judge = EngineJudge(HttpEngineClient(j.url), AutoTokenizer.from_pretrained(j.model), j.max_new_tokens)
        else:
            judge = OpenAIJudge(j.url, j.model, j.api_key_env, j.max_new_tokens)
    return Gate(rules, judge, cfg.mode, j.timeout_s, j.on_error, context_messages=j.context_messages)
