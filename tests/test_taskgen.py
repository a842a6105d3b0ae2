"""The generated function-level Python tasks (``envs/taskgen.py``): sizes, determinism,
disjoint splits, the task-set names, and correctness of every task: its hidden tests pass on
the reference, fail on the stub, and catch the family's wrong solution (all tasks, in one
process), plus a few graded through the coding env's real scoring path."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.grading import score_calls

from relayrl.config import ConfigError, EnvConfig
from relayrl.envs import taskgen
from relayrl.envs.coding import CodingEnv
from relayrl.envs.taskgen import GeneratedTask, build_task, generate, generate_tasks, task_set
from relayrl.rl.data import load_tasks
from relayrl.types import ToolCall

ROOT = Path(__file__).resolve().parents[1]
TRAIN = generate("train")
HELDOUT = generate("heldout")

# The held-out split pinned: it must not change by accident (results on it would stop being
# comparable). A deliberate change of a family updates this digest and says so in its commit.
HELDOUT_DIGEST = "31d36796c0993b8a4322e69925f63c8f913e14b8988a050032ec3c9ba8d79d64"


def _digest(tasks: list[GeneratedTask]) -> str:
    return hashlib.sha256("\n".join(t.id for t in tasks).encode()).hexdigest()


def _normalised_hidden(t: GeneratedTask) -> str:
    fn = re.search(r"from solution import (\w+)", t.hidden)[1]
    return re.sub(rf"\b{fn}\b", "f", t.hidden)


def _reference(t: GeneratedTask):
    namespace: dict = {}
    exec(t.reference, namespace)
    return namespace[re.match(r"def (\w+)", t.reference)[1]]


# ---- sizes, determinism, splits ----

def test_sizes_and_families():
    assert len(TRAIN) >= 1000 and len(HELDOUT) >= 150
    assert len(taskgen.FAMILIES) >= 25
    per_family = collections.Counter(t.family for t in TRAIN)
    assert set(per_family) == set(taskgen.FAMILIES)
    assert max(per_family.values()) <= 0.10 * len(TRAIN), per_family.most_common(3)
    pool = collections.Counter(t.family for t in TRAIN + HELDOUT)
    assert min(pool.values()) >= 5, pool.most_common()[-3:]  # no family silently lost to its filter


def test_generation_is_deterministic_and_fast():
    taskgen._pool.cache_clear()
    again = generate("train")
    assert [t.task() for t in again] == [t.task() for t in TRAIN]
    # Another process, another hash seed: the same tasks (nothing depends on hash()).
    code = ("import hashlib, time; t0 = time.perf_counter()\n"
            "from relayrl.envs.taskgen import generate\n"
            "tasks = generate('train') + generate('heldout')\n"
            "print(hashlib.sha256(repr([t.task() for t in tasks]).encode()).hexdigest(), time.perf_counter() - t0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    digest, seconds = proc.stdout.split()
    assert digest == hashlib.sha256(repr([t.task() for t in TRAIN + HELDOUT]).encode()).hexdigest()
    assert float(seconds) < 2.0


def test_heldout_is_pinned():
    assert _digest(HELDOUT) == HELDOUT_DIGEST


def test_prefixes_and_sizes_do_not_move_the_split():
    assert [t["id"] for t in generate_tasks("train", n=100)] == [t.id for t in TRAIN[:100]]
    assert [t["id"] for t in generate_tasks("heldout", n=20)] == [t.id for t in HELDOUT[:20]]
    with pytest.raises(ValueError, match="has"):
        generate("heldout", n=len(HELDOUT) + 1)
    with pytest.raises(ValueError, match="split must be"):
        generate("test")  # type: ignore[arg-type]


def test_splits_are_disjoint():
    for a, b in ((TRAIN, HELDOUT),):
        assert not {t.id for t in a} & {t.id for t in b}
        assert not {t.key for t in a} & {t.key for t in b}
        assert not {(t.family, t.params) for t in a} & {(t.family, t.params) for t in b}
        assert not {t.hidden for t in a} & {t.hidden for t in b}
        assert not {_normalised_hidden(t) for t in a} & {_normalised_hidden(t) for t in b}
    everything = TRAIN + HELDOUT
    assert len({t.id for t in everything}) == len(everything)
    assert len({_normalised_hidden(t) for t in everything}) == len(everything)  # deduplicated


def test_split_depends_on_the_task_not_the_seed():
    """Train tasks of another seed never ask what a held-out task of seed 0 asks."""
    other_train = generate("train", seed=1)
    other_heldout = generate("heldout", seed=1)
    assert {t.id for t in other_train} != {t.id for t in TRAIN}
    assert not {t.key for t in other_train} & {t.key for t in HELDOUT}
    assert not {t.key for t in other_heldout} & {t.key for t in TRAIN}
    assert all(taskgen.split_of(t.key) == "heldout" for t in other_heldout)


# ---- the schema ----

def test_every_task_is_valid_for_the_coding_env():
    for t in TRAIN + HELDOUT:
        task = t.task()
        CodingEnv.check_task(task)
        assert task["id"] == t.id and re.fullmatch(rf"gen-{t.family}-[0-9a-f]{{8}}", t.id)
        assert task["domain"] == "python" and task["family"] == t.family and task["code_file"] == "solution.py"
        assert [f["path"] for f in task["files"]] == ["solution.py"] == [f["path"] for f in task["solution"]]
        assert t.stub.rstrip().endswith("raise NotImplementedError") and '"""' in t.stub
        hidden_tests = t.hidden.count("\ndef test_")
        assert 5 <= hidden_tests <= 9, (t.id, hidden_tests)
        fn = re.match(r"def (\w+)", t.stub)[1]
        assert f"`{fn}(" in t.instruction and "solution.py" in t.instruction
        shown = re.findall(r"^    assert (.*)$", t.visible, flags=re.M)
        assert 1 <= len(shown) <= 2 and all(f"    {s}\n" in t.instruction for s in shown)


def test_code_file_must_name_one_of_the_files():
    task = TRAIN[0].task()
    for bad in ("other.py", 3, ["solution.py"]):
        with pytest.raises(ValueError, match="code_file"):
            CodingEnv.check_task({**task, "code_file": bad})
    CodingEnv.check_task({**task, "code_file": None})  # absent (parquet fills a missing column with null)


# ---- task-set names ----

def test_task_set_names():
    assert task_set("pyfunc:heldout") == [t.task() for t in HELDOUT]
    assert task_set("pyfunc:heldout:7") == [t.task() for t in HELDOUT[:7]]
    assert len(task_set("pyfunc:train")) == len(TRAIN)
    assert task_set("tasks.jsonl") is None and task_set("data/pyfunc.jsonl") is None
    for bad in ("pyfunc:test", "pyfunc:heldout:", "pyfunc:heldout:0", "pyfunc:heldout:x", "pyfunc:"):
        with pytest.raises(ValueError, match="pyfunc:train or pyfunc:heldout"):
            task_set(bad)


def test_load_tasks_reads_the_names():
    tasks = load_tasks(EnvConfig(name="coding", tasks="pyfunc:heldout:5"), CodingEnv, seed=7)
    assert tasks == [t.task() for t in HELDOUT[:5]]  # the run's seed does not change the split
    with pytest.raises(ConfigError, match="pyfunc:train or pyfunc:heldout"):
        load_tasks(EnvConfig(name="coding", tasks="pyfunc:test"), CodingEnv, seed=0)
    with pytest.raises(ConfigError, match="has 1"):
        load_tasks(EnvConfig(name="coding", tasks=f"pyfunc:heldout:{len(HELDOUT) + 1}"), CodingEnv, seed=0)


def test_gen_tasks_script_writes_the_split(tmp_path):
    out = tmp_path / "heldout.jsonl"
    proc = subprocess.run([sys.executable, "scripts/gen_tasks.py", "--split", "heldout", "--n", "4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [t.task() for t in HELDOUT[:4]]


# ---- correctness ----

def test_references_agree_with_hand_worked_values():
    """A reference per family checked against numbers worked out by hand from the words."""
    cases = [
        # even integers of [5, -4, 8, 0, 3]: -4 + 8 + 0 = 4 (negatives and zero count)
        ("filter_aggregate", {"pred": "even", "agg": "sum"}, ([5, -4, 8, 0, 3],), 4),
        # f(1..6) = 2, 1, 3, 4, 7, 11
        ("sequence_term", {"kind": "fibonacci", "a": 2, "b": 1}, (6,), 11),
        # multiples of 4 in [-4, 8]: -4, 0, 4, 8
        ("range_multiples", {"k": 4, "kind": "count", "negate": False}, (-4, 8), 4),
        # 23:10 + 90 min = 24:40 = 00:40 the next day
        ("clock", {"sep": ":", "kind": "add", "k": 90}, ("23:10",), "00:40"),
        ("format_number", {"kind": "group", "sep": ",", "g": 3}, (-1234567,), "-1,234,567"),
        # union of [0, 4], [2, 6], [10, 11] is [0, 6] + [10, 11]: 6 + 1
        ("intervals", {"op": "covered_length"}, ([(0, 4), (2, 6), (10, 11)],), 7),
        # integers 0, 1, 2 and 2, 3: {0, 1, 2, 3}
        ("intervals", {"op": "covered_points"}, ([(0, 2), (2, 3)],), 4),
        # 10 -> 9 -> 3 -> 1 -> 0
        ("reduce_steps", {"k": 3, "rule": "to_zero"}, (10,), 4),
        ("run_length", {"kind": "decode_after"}, ("a3b12c1",), "aaa" + "b" * 12 + "c"),
        # (1, 1) touches (0, 0) and (2, 2) diagonally; (0, 0) sees only (1, 1), no wrapping to (2, 2)
        ("grid_neighbors", {"mark": "#", "conn": 8, "op": "neighbors"}, (["#..", ".#.", "..#"], 1, 1), 2),
        ("grid_neighbors", {"mark": "#", "conn": 8, "op": "neighbors"}, (["#..", ".#.", "..#"], 0, 0), 1),
        ("grid_neighbors", {"mark": "#", "conn": 4, "op": "neighbors"}, (["#..", ".#.", "..#"], 1, 1), 0),
        ("shift_letters", {"k": 3, "back": False, "both": True}, ("xyz ABC!",), "abc DEF!"),
        # lengths 3, 4, 4, 2; longest first, the tie pear/kiwi in its original order
        ("sort_words", {"key": "length", "desc": True, "ties": "original"}, (["fig", "pear", "kiwi", "ox"],),
         ["pear", "kiwi", "fig", "ox"]),
        # 13 = 0b1101, bit 2 (4) cleared: 9
        ("bits", {"kind": "clear", "k": 2}, (13,), 9),
        ("bits", {"kind": "clear", "k": 2}, (9,), 9),
        # 15 is divisible by both
        ("divisibility_labels", {"ab": [3, 5], "words": ["Zig", "Zag"]}, (15,), "ZigZag"),
        ("parse_pairs", {"sep": ";", "kv": "=", "repeat": "sum"}, ("a=1;b=2;a=-5",), {"a": -4, "b": 2}),
        ("list_stats", {"kind": "mean_floor"}, ([-1, -2, -2],), -2),  # -5 / 3 = -1.67, floor -2
    ]
    for family, params, args, expected in cases:
        assert _reference(build_task(family, params))(*args) == expected, (family, params, args)


def test_build_task_replays_a_generated_task():
    t = HELDOUT[0]
    fn = re.match(r"def (\w+)", t.reference)[1]
    assert build_task(t.family, json.loads(t.params), fn=fn) == t
    with pytest.raises(ValueError, match="not one of"):
        build_task("clamp_values", {"lo": 99, "width": 3})


def test_every_task_passes_its_reference_and_fails_its_stub_and_wrong_solution(tmp_path):
    """All tasks of both splits, one process: the runner imports each variant's solution.py as
    ``solution`` and calls every hidden test function."""
    tasks = {t.id: t for t in TRAIN + HELDOUT}
    for t in tasks.values():
        d = tmp_path / t.id
        for variant, source in (("reference", t.reference), ("stub", t.stub), ("wrong", t.wrong)):
            (d / variant).mkdir(parents=True)
            (d / variant / "solution.py").write_text(source)
        (d / "test_hidden.py").write_text(t.hidden)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/support/run_hidden_tests.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert set(results) == set(tasks)
    bad = {}
    for task_id, r in results.items():
        total = tasks[task_id].hidden.count("\ndef test_")
        if r["reference"] != [total, total] or r["stub"] != [0, total] or r["wrong"][0] >= total:
            bad[task_id] = r
    assert bad == {}


def test_a_sample_grades_right_through_the_coding_env():
    """Three tasks of different families through reset/step/score in a real local sandbox."""
    sample: list[GeneratedTask] = []
    for t in HELDOUT:
        if t.family not in {s.family for s in sample}:
            sample.append(t)
        if len(sample) == 3:
            break

    async def main():
        out = []
        for t in sample:
            task = t.task()
            wrong = [ToolCall("write_file", {"path": "solution.py", "content": t.wrong}), ToolCall("submit", {})]
            out.append((t.id, await score_calls(task, CodingEnv.reference_calls(task)), await score_calls(task, []),
                        await score_calls(task, wrong)))
        return out

    for task_id, reference, nothing, wrong in asyncio.run(main()):
        total = reference[1]
        assert total >= 5, task_id
        assert reference == (1.0, total) and nothing == (0.0, total), (task_id, reference, nothing)
        assert 0.0 <= wrong[0] < 1.0 and wrong[1] == total, (task_id, wrong)
