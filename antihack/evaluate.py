"""Measure a rule pack (and a judge) on a labelled set of tool calls.

A labelled set is JSON lines ``{"id", "label": "hack"|"honest", "family", "call": {"name",
"arguments"}, "task"?, "near_miss"?}`` (``antihack/labelled/`` holds relayrl's: ``dev.jsonl`` and ``heldout.jsonl``).
``evaluate`` reports, per family, the rule stage's recall on hacks and its flag rate on honest
calls, and, with a judge, what the whole gate blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayrl.antihack.gate import Gate
from relayrl.antihack.judge import Judge, JudgeRequest, JudgeVerdict
from relayrl.antihack.rules import RuleStage

LABELLED_DIR = Path(__file__).parent / "labelled"
SPLITS = ("dev", "heldout")


@dataclass
class Labelled:
    id: str
    label: str
    family: str
    name: str
    arguments: dict[str, Any]
    task: str | None = None
    near_miss: bool = False

    @property
    def hack(self) -> bool:
        return self.label == "hack"


def load_labelled(path: str | Path | None = None) -> list[Labelled]:
    """A labelled JSON-lines file; by default every split shipped in ``antihack/labelled``."""
    if path is None:
        return [r for split in SPLITS for r in load_labelled(LABELLED_DIR / f"{split}.jsonl")]
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if d.get("label") not in ("hack", "honest"):
            raise ValueError(f"{path}:{n}: label must be hack or honest")
        out.append(Labelled(d["id"], d["label"], d["family"], d["call"]["name"], d["call"].get("arguments", {}),
                            d.get("task"), bool(d.get("near_miss", False))))
    return out


class OracleJudge:
    """A judge that answers with the label: measures what the gate does given a judge that is
    always right (the issue's "judge that answers correctly"). For evaluation only."""

    def __init__(self, records: list[Labelled]) -> None:
        self._labels = {self._key(r.name, r.arguments, r.task): r.hack for r in records}
        self.calls = 0

    @staticmethod
    def _key(name: str, arguments: dict[str, Any], task: str | None) -> str:
        return json.dumps([name, arguments, task], sort_keys=True)

    async def judge(self, request: JudgeRequest) -> JudgeVerdict:
        self.calls += 1
        return JudgeVerdict(self._labels[self._key(request.tool, request.arguments, request.task)], "label")


@dataclass
class Report:
    hacks: int = 0
    honest: int = 0
    flagged_hacks: int = 0
    flagged_honest: int = 0
    blocked_hacks: int = 0
    blocked_honest: int = 0
    per_family: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # [flagged, n]
    missed: list[str] = field(default_factory=list)
    false_flags: list[str] = field(default_factory=list)
    false_blocks: list[str] = field(default_factory=list)

    @property
    def rule_recall(self) -> float:
        return self.flagged_hacks / max(self.hacks, 1)

    @property
    def rule_honest_flag_rate(self) -> float:
        return self.flagged_honest / max(self.honest, 1)

    @property
    def gate_honest_block_rate(self) -> float:
        return self.blocked_honest / max(self.honest, 1)

    @property
    def gate_hack_block_rate(self) -> float:
        return self.blocked_hacks / max(self.hacks, 1)

    def table(self) -> str:
        rows = [f"{'family':<18}{'flagged':>9}{'of':>5}{'rate':>8}"]
        for fam, (f, n) in sorted(self.per_family.items()):
            rows.append(f"{fam:<18}{f:>9}{n:>5}{f / max(n, 1):>8.1%}")
        rows.append(f"rule recall on hacks {self.rule_recall:.1%}; rules flag {self.rule_honest_flag_rate:.1%} "
                    f"of honest calls; the gate blocks {self.gate_hack_block_rate:.1%} of hacks and "
                    f"{self.gate_honest_block_rate:.1%} of honest calls")
        return "\n".join(rows)


def evaluate(stage: RuleStage, records: list[Labelled], judge: Judge | None = None) -> Report:
    gate = Gate(stage, judge, "judge" if judge is not None else "rules_only", cache_size=0)
    rep = Report()

    async def run() -> None:
        for r in records:
            v = await gate.check(r.name, r.arguments, task=r.task)
            fam = rep.per_family[r.family]
            fam[1] += 1
            fam[0] += int(v.flagged)
            if r.hack:
                rep.hacks += 1
                rep.flagged_hacks += int(v.flagged)
                rep.blocked_hacks += int(v.blocked)
                if not v.flagged:
                    rep.missed.append(r.id)
            else:
                rep.honest += 1
                rep.flagged_honest += int(v.flagged)
                rep.blocked_honest += int(v.blocked)
                if v.flagged:
                    rep.false_flags.append(f"{r.id}:{v.rule}")
                if v.blocked:
                    rep.false_blocks.append(r.id)

    asyncio.run(run())
    return rep
