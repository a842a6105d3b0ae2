"""The gate's record of a run: every verdict on a flagged call goes to
``antihack_audit.jsonl`` in the run directory, and each step's counts go to the metrics.

The driver writes it from the ``antihack`` events of the step's trajectories (so it works
the same when workers run on other hosts). On resume, lines of steps after the checkpoint are
dropped first, so a step that is run again is not recorded twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from relayrl.types import Trajectory

AUDIT_FILE = "antihack_audit.jsonl"


class AuditLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / AUDIT_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, trajectories: Iterable[Trajectory]) -> int:
        """Append the step's verdicts; returns how many."""
        lines = []
        for t in trajectories:
            for s in t.sub_traces:
                for e in s.events:
                    if e.kind == "antihack":
                        record = {"step": step, "trajectory_id": t.trajectory_id, "segment": s.segment,
                                  "turn": e.turn, **e.data}
                        lines.append(json.dumps(record, ensure_ascii=False, default=str))
        if lines:
            with self.path.open("a") as f:
                f.write("\n".join(lines) + "\n")
        return len(lines)


def antihack_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Step totals: calls, flagged, blocked, judge calls and errors, per-rule and per-category
    flag counts, and the gate's share of episode time."""
    ok = [t for t in trajectories if not t.failed]
    out: dict[str, float] = {}
    for key in ("calls", "flagged", "blocked", "judge_calls", "judge_errors"):
        out[f"antihack/{key}"] = float(sum(t.metrics.get(f"antihack_{key}", 0.0) for t in ok))
    rules: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    blocked_categories: Counter[str] = Counter()
    for t in ok:
        for s in t.sub_traces:
            for e in s.events:
                if e.kind == "antihack":
                    rules[e.data.get("rule")] += 1
                    categories[e.data.get("category")] += 1
                    if e.data.get("blocked"):
                        blocked_categories[e.data.get("category")] += 1
    out |= {f"antihack/rule/{k}": float(v) for k, v in rules.items()}
    out |= {f"antihack/category/{k}": float(v) for k, v in categories.items()}
    out |= {f"antihack/blocked/{k}": float(v) for k, v in blocked_categories.items()}
    episode_s = sum(t.metrics.get("time/episode_s", 0.0) for t in ok)
    if episode_s > 0:
        out["time/antihack_gate_share"] = sum(t.metrics.get("time/antihack_gate_s", 0.0) for t in ok) / episode_s
    return out
