"""Task files in the documented schema, jsonl or parquet, load through ``datasets``, are checked
at start-up, and score through the coding env exactly as the in-memory task does."""

from __future__ import annotations

import asyncio
import json

import pytest

from relayrl.config import ConfigError, EnvConfig
from relayrl.envs.coding import CodingEnv
from relayrl.rl.data import load_tasks

from test_coding_env import TASK


def write_jsonl(path, tasks):
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


def write_parquet(path, tasks):
    import datasets

    datasets.Dataset.from_list(tasks).to_parquet(str(path))
    return path


def score(task, calls) -> float:
    async def go():
        env = CodingEnv()
        try:
            await env.reset(task)
            for call in calls:
                if (await env.step(call)).done:
                    break
            return (await env.score()).reward
        finally:
            await env.close()

    return asyncio.run(go())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_task_file_round_trip_and_scores(tmp_path, fmt):
    other = {**TASK, "id": "add2", "files": [{"path": "calc.py", "content": "x = 1\n"}, {"path": "README", "content": "hi"}]}
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    path = writer(tmp_path / f"tasks.{fmt}", [TASK, other])
    tasks = load_tasks(EnvConfig(name="coding", tasks=str(path)), CodingEnv, seed=0)
    assert [t["id"] for t in tasks] == ["add", "add2"]
    # Lists of {path, content} survive Arrow unchanged (a dict keyed by path would not: Arrow
    # would merge the keys of all tasks into one struct and fill the gaps with nulls).
    assert tasks[0]["files"] == TASK["files"] and tasks[1]["files"] == other["files"]
    assert score(tasks[0], CodingEnv.reference_calls(tasks[0])) == 1.0
    assert score(tasks[0], []) == 0.0


def test_a_bad_task_is_named_at_start_up(tmp_path):
    path = write_jsonl(tmp_path / "tasks.jsonl", [TASK, {**TASK, "id": "broken", "hidden_tests": []}])
    with pytest.raises(ConfigError) as e:
        load_tasks(EnvConfig(name="coding", tasks=str(path)), CodingEnv, seed=0)
    assert "task 1 of" in str(e.value) and "'hidden_tests' is empty" in str(e.value)


def test_an_unreadable_task_file_is_a_config_error(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "a", \n')
    with pytest.raises(ConfigError, match="could not be read as json"):
        load_tasks(EnvConfig(name="coding", tasks=str(path)), CodingEnv, seed=0)
