"""The shipped Python tasks: in sync with their sources, well formed, and graded right: for
every task the reference solution scores 1.0 and the untouched workspace 0.0, through the
coding env and a real local sandbox (the same path a training run takes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from support.grading import score_calls

from relayrl.envs.coding import CodingEnv

ROOT = Path(__file__).resolve().parents[1]
TASKS = CodingEnv.default_tasks()


def test_jsonl_is_built_from_the_sources():
    proc = subprocess.run([sys.executable, "scripts/build_tasks.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_task_set_shape():
    assert len(TASKS) >= 50
    assert len({t["id"] for t in TASKS}) == len(TASKS)
    for t in TASKS:
        CodingEnv.check_task(t)
        assert t["visible_tests"] and len(t["hidden_tests"]) >= 1 and t["solution"], t["id"]
        hidden_functions = sum(e["content"].count("\ndef test_") + e["content"].startswith("def test_")
                               for e in t["hidden_tests"])
        assert hidden_functions >= 3, t["id"]


def test_every_task_grades_its_reference_one_and_its_start_zero():
    async def main():
        sem = asyncio.Semaphore(4)

        async def one(task):
            async with sem:
                return (task["id"], await score_calls(task, CodingEnv.reference_calls(task)), await score_calls(task, []))

        return await asyncio.gather(*(one(t) for t in TASKS))

    wrong = [(tid, best, none) for tid, best, none in asyncio.run(main())
             if best[0] != 1.0 or none[0] != 0.0 or best[1] < 3]
    assert wrong == []
