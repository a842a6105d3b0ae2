"""The anti-hack gate: rules, then the judge, on every tool call before it runs.

    verdict = await gate.check("bash", {"command": "git log --all"}, task=..., context=...)
    if verdict.blocked:
        observation = verdict.dummy ...      # the call never runs; the episode goes on

The rule stage flags (high recall, microseconds); only flagged calls reach the judge (high
precision, one LLM call). ``mode="rules_only"`` blocks whatever the rules flag. A judge that
fails or is too slow yields ``on_judge_error`` (block by default: a hack that slips through
is reward the policy learns from; a blocked honest call only costs it one turn). Verdicts are
cached per call, so an agent retrying the same command does not cost a second judge call.
The gate never touches the reward.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from relayrl.antihack.judge import Judge, JudgeError, JudgeRequest
from relayrl.antihack.rules import Dummy, RuleHit, RuleStage

Mode = Literal["rules_only", "judge"]


@dataclass
class Verdict:
    """What the gate decided about one call.

    flagged: some rule flagged it. blocked: it must not run (the agent gets ``dummy``).
    stage: who decided: ``rules`` (rules-only mode, or the judge failed), ``judge``, or None
    (nothing flagged). rule/category: the most severe flagging rule. rules: every flagging
    rule. judge_error: why the judge gave no verdict, when it did not.
    """

    flagged: bool = False
    blocked: bool = False
    stage: str | None = None
    rule: str | None = None
    category: str | None = None
    reason: str = ""
    rules: list[str] = field(default_factory=list)
    judge_error: str | None = None
    cached: bool = False
    rule_s: float = 0.0
    judge_s: float = 0.0
    dummy: Dummy | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dummy"] = asdict(self.dummy) if self.dummy is not None else None
        return d

    def public(self) -> dict[str, Any]:
        """The CLI's line: flagged, blocked, stage, rule, category, reason."""
        return {"flagged": self.flagged, "blocked": self.blocked, "stage": self.stage, "rule": self.rule,
                "category": self.category, "reason": self.reason}


class Gate:
    """Args:
        rules: the rule stage.
        judge: the judge; None forces rules-only.
        mode: ``judge`` (flagged calls go to the judge) or ``rules_only``.
        judge_timeout_s: a judge slower than this counts as an error.
        on_judge_error: ``block`` or ``allow`` when the judge errs or times out.
        cache_size: verdicts remembered (per call and task); 0 turns the cache off.
        context_messages: recent messages the agent loop shows the judge.
    """

    def __init__(self, rules: RuleStage, judge: Judge | None = None, mode: Mode = "judge",
                 judge_timeout_s: float = 30.0, on_judge_error: Literal["block", "allow"] = "block",
                 cache_size: int = 4096, context_messages: int = 6) -> None:
        self.rules = rules
        self.judge = judge
        self.mode: Mode = mode if judge is not None else "rules_only"
        self.judge_timeout_s = judge_timeout_s
        self.on_judge_error = on_judge_error
        self.cache_size = cache_size
        self.context_messages = context_messages
        self._cache: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self.counts: Counter[str] = Counter()  # calls, flagged, blocked, judge_calls, judge_errors, ...

    async def check(self, tool: str, arguments: dict[str, Any], task: str | None = None,
                    context: list[dict[str, str]] | None = None) -> Verdict:
        self.counts["calls"] += 1
        hits, rule_s = self.rules.timed_check(tool, arguments)
        self.counts["rule_us"] += int(rule_s * 1e6)
        if not hits:
            return Verdict(rule_s=rule_s)
        top = hits[0]
        v = Verdict(flagged=True, rule=top.rule.id, category=top.rule.category, rules=[h.rule.id for h in hits],
                    rule_s=rule_s, stage="rules")
        self.counts["flagged"] += 1
        if self.mode == "rules_only":
            v.blocked, v.reason = True, f"rules only: {top.rule.description or top.rule.id}"
        else:
            key = json.dumps([tool, arguments, task], sort_keys=True, default=str)
            if key in self._cache:
                v.blocked, v.reason = self._cache[key]
                v.stage, v.cached = "judge", True
                self._cache.move_to_end(key)
                self.counts["judge_cached"] += 1
            else:
                await self._ask_judge(v, JudgeRequest(tool, arguments, task, list(context or []), hits), key)
        if v.blocked:
            self.counts["blocked"] += 1
            v.dummy = self._dummy(top, tool)
        return v

    async def _ask_judge(self, v: Verdict, request: JudgeRequest, key: str) -> None:
        assert self.judge is not None
        self.counts["judge_calls"] += 1
        start = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self.judge.judge(request), self.judge_timeout_s)
        except asyncio.TimeoutError:
            v.judge_error = f"the judge took longer than {self.judge_timeout_s:g}s"
        except JudgeError as e:
            v.judge_error = str(e)
        except Exception as e:  # a judge bug must not kill the rollout; it is counted and logged
            v.judge_error = f"{type(e).__name__}: {e}"
        v.judge_s = time.perf_counter() - start
        self.counts["judge_us"] += int(v.judge_s * 1e6)
        if v.judge_error is not None:
            self.counts["judge_errors"] += 1
            v.blocked = self.on_judge_error == "block"
            v.reason = f"judge failed ({v.judge_error}); default: {self.on_judge_error}"
            return
        v.stage, v.blocked, v.reason = "judge", answer.block, answer.reason
        if self.cache_size > 0:
            self._cache[key] = (v.blocked, v.reason)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    @staticmethod
    def _dummy(hit: RuleHit, tool: str) -> Dummy:
        op = hit.op
        values = {"program": op.program or tool, "path": op.path or "", "host": op.host or "", "url": op.url or "",
                  "cmd": " ".join(op.argv)[:200]}
        return hit.rule.dummy_for(op, tool).fill(values)
