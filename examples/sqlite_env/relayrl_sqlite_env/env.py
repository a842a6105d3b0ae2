"""Answer a question about a small database with one SQL query.

This package is what a user of relayrl writes to plug in an environment: a class with async
``reset/step/score/close`` (the ``relayrl.envs.base.Env`` protocol), named in YAML as
``env.name: relayrl_sqlite_env:SqliteQueryEnv``. Nothing in relayrl knows about it.

A task is ``{id, setup_sql, question, expected_sql}``: the database is built from
``setup_sql`` in memory for each episode; the agent explores it with ``run_sql`` and ends with
``answer(query)``. The reward is 1.0 when the answer query returns the same rows as
``expected_sql`` (as a multiset; order counts only if the question asks for it via
``ordered: true``), else 0.0.

Queries run in an in-memory SQLite database opened read-only to the agent (``PRAGMA
query_only``), with a step budget through the progress handler so a runaway query (a huge
cross join, a recursive CTE) is interrupted instead of hanging the episode.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from relayrl.envs.base import Reset, Score, StepResult
from relayrl.envs.tools import Param, Tool, check_call
from relayrl.types import ToolCall

TOOLS = {t.name: t for t in (
    Tool("run_sql", "Run a read-only SQL query on the database and see up to 20 rows.",
         (Param("query", "string", "One SQLite SELECT statement."),)),
    Tool("answer", "Give the final query whose result answers the question. Ends the episode.",
         (Param("query", "string", "One SQLite SELECT statement."),)),
)}

TASKS_FILE = Path(__file__).with_name("tasks.jsonl")


class QueryBudgetExceeded(Exception):
    pass


class SqliteQueryEnv:
    """Args:
        max_rows: rows shown per ``run_sql`` observation.
        max_vm_steps: SQLite VM instructions a query may run (x1000) before it is interrupted.
        system_prompt: replaces the default system message.
    """

    def __init__(self, max_rows: int = 20, max_vm_steps: int = 2000, system_prompt: str | None = None) -> None:
        if max_rows < 1 or max_vm_steps < 1:
            raise ValueError("max_rows and max_vm_steps must be >= 1")
        self.max_rows = max_rows
        self.max_vm_steps = max_vm_steps
        self.system_prompt = system_prompt or "Answer the question about the database with one SQL query."
        self._db: sqlite3.Connection | None = None
        self._task: dict[str, Any] = {}
        self._answer: str | None = None
        self._errors = 0

    @staticmethod
    def default_tasks(seed: int = 0) -> list[dict[str, Any]]:
        return [json.loads(line) for line in TASKS_FILE.read_text().splitlines() if line.strip()]

    @staticmethod
    def check_task(task: dict[str, Any]) -> None:
        for key in ("id", "setup_sql", "question", "expected_sql"):
            if not isinstance(task.get(key), str) or not task[key].strip():
                raise ValueError(f"task {task.get('id')!r}: {key!r} must be non-empty text")
        db = sqlite3.connect(":memory:")
        try:
            db.executescript(task["setup_sql"])
            db.execute(task["expected_sql"]).fetchall()
        except sqlite3.Error as e:
            raise ValueError(f"task {task['id']!r}: its SQL does not run: {e}") from None
        finally:
            db.close()

    @staticmethod
    def reference_calls(task: dict[str, Any]) -> list[ToolCall]:
        return [ToolCall("answer", {"query": task["expected_sql"]})]

    def _query(self, sql: str) -> list[tuple]:
        assert self._db is not None
        steps = 0

        def budget() -> int:
            nonlocal steps
            steps += 1
            return int(steps > self.max_vm_steps)  # non-zero interrupts the query

        self._db.set_progress_handler(budget, 1000)
        try:
            return self._db.execute(sql).fetchall()
        except sqlite3.OperationalError as e:
            if steps > self.max_vm_steps:
                raise QueryBudgetExceeded("the query ran too long and was interrupted") from None
            raise e
        finally:
            self._db.set_progress_handler(None, 0)

    async def reset(self, task: dict[str, Any]) -> Reset:
        self._task, self._answer, self._errors = task, None, 0
        self._db = sqlite3.connect(":memory:")
        self._db.executescript(task["setup_sql"])
        self._db.execute("PRAGMA query_only = ON")
        tables = [r[0] for r in self._db.execute("SELECT sql FROM sqlite_master WHERE type='table'")]
        user = f"{task['question']}\n\nSchema:\n" + "\n".join(tables)
        return Reset(messages=[{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}],
                     tools=[t.schema() for t in TOOLS.values()])

    async def step(self, call: ToolCall) -> StepResult:
        problem = check_call(call, TOOLS, max_argument_bytes=8192)
        if problem is not None:
            self._errors += 1
            return StepResult(observation=f"error: {problem}")
        if call.name == "answer":
            self._answer = call.arguments["query"]
            return StepResult(observation="answer recorded", done=True)
        try:
            rows = self._query(call.arguments["query"])
        except (sqlite3.Error, QueryBudgetExceeded, ValueError) as e:  # ValueError: e.g. NUL in the text
            self._errors += 1
            return StepResult(observation=f"error: {e}")
        shown = "\n".join(repr(r) for r in rows[: self.max_rows])
        more = f"\n... {len(rows) - self.max_rows} more rows" if len(rows) > self.max_rows else ""
        return StepResult(observation=f"{len(rows)} row(s)\n{shown}{more}")

    async def score(self) -> Score:
        correct = 0.0
        if self._answer is not None and self._db is not None:
            try:
                got = self._query(self._answer)
                want = self._query(self._task["expected_sql"])
                same = got == want if self._task.get("ordered") else Counter(got) == Counter(want)
                correct = float(same)
            except (sqlite3.Error, QueryBudgetExceeded, ValueError):
                correct = 0.0
        return Score(reward=correct, details={"answered": float(self._answer is not None),
                                              "sql_errors": float(self._errors)})

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
