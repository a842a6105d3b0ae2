"""``relayrl antihack check``: the gate over JSON lines, one verdict line per input line.

    echo '{"name": "bash", "arguments": {"command": "git log --all"}}' | relayrl antihack check --rules-only

Input lines: ``{"name": TOOL, "arguments": {...}, "task": "optional instruction"}``. Output
lines: ``{"flagged", "blocked", "stage", "rule", "category", "reason"}``; a line that is not
such an object gets ``{"error": "..."}`` and the rest still run. With the judge (no
``--rules-only``), ``--config`` names a job YAML whose ``antihack.judge`` says who judges; the
``policy`` kind loads that job's ``model.path`` in-process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from relayrl.config import Config, ConfigError, load_config


def _build_gate(cfg: Config, rules_only: bool) -> tuple[Any, Any]:
    from relayrl.antihack import RulePackError, make_gate, make_rule_stage
    from relayrl.antihack.gate import Gate

    ah = cfg.antihack
    try:
        if rules_only or ah.mode == "rules_only":
            return Gate(make_rule_stage(ah), None, "rules_only"), None
        if ah.judge.kind == "policy":
            from transformers import AutoTokenizer

            from relayrl.model import resolve_model_path
            from relayrl.rollout.cpu_engine import CpuEngine

            path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
            engine = CpuEngine(path, max_batch_size=4, max_seq_len=cfg.engine.max_seq_len,
                               num_threads=cfg.engine.num_threads)
            return make_gate(ah, engine, AutoTokenizer.from_pretrained(path)), engine
        return make_gate(ah), None
    except RulePackError as e:
        raise ConfigError(f"antihack.rule_packs: {e}") from None


def _parse_line(line: str) -> tuple[str, dict[str, Any], str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected an object {\"name\": ..., \"arguments\": {...}}")
    name, arguments, task = obj.get("name"), obj.get("arguments", {}), obj.get("task")
    if not isinstance(name, str) or not name:
        raise ValueError("'name' (the tool name, a string) is missing")
    if isinstance(arguments, str):  # OpenAI-style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ValueError("'arguments' is a string that is not a JSON object") from None
    if not isinstance(arguments, dict):
        raise ValueError("'arguments' must be an object")
    if task is not None and not isinstance(task, str):
        raise ValueError("'task' must be a string")
    return name, arguments, task


async def check_lines(gate: Any, lines: TextIO, out: TextIO) -> tuple[int, int]:
    """Verdict lines for ``lines``; returns (calls checked, bad lines)."""
    checked = bad = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            name, arguments, task = _parse_line(line)
        except ValueError as e:
            bad += 1
            out.write(json.dumps({"error": f"line {number}: {e}"}) + "\n")
            out.flush()
            continue
        verdict = await gate.check(name, arguments, task=task)
        out.write(json.dumps(verdict.public()) + "\n")
        out.flush()
        checked += 1
    return checked, bad


def run_check(config: str | None, rules_only: bool) -> int:
    cfg = load_config(config) if config else Config()
    gate, engine = _build_gate(cfg, rules_only)

    async def main() -> tuple[int, int]:
        try:
            return await check_lines(gate, sys.stdin, sys.stdout)
        finally:
            close = getattr(gate.judge, "close", None)
            if close is not None:
                await close()

    try:
        checked, bad = asyncio.run(main())
    finally:
        if engine is not None:
            engine.shutdown()
    counts = gate.counts
    print(f"relayrl antihack check: {checked} calls, {counts['flagged']} flagged, {counts['blocked']} blocked, "
          f"{counts['judge_calls']} judge calls ({counts['judge_errors']} failed), {bad} bad lines", file=sys.stderr)
    return 0
