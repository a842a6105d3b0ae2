"""The coding env on a real local sandbox: tools, bad input, hidden-test scoring and the ways an
agent could try to game the grader."""

from __future__ import annotations

import asyncio
import secrets
import textwrap

import pytest

from relayrl.envs.coding import CodingEnv, junit_counts
from relayrl.types import ToolCall

STUB = "def add(a, b):\n    raise NotImplementedError\n"
HIDDEN = textwrap.dedent("""\
    from calc import add

    def test_zero():
        assert add(0, 0) == 0

    def test_negative():
        assert add(-1, -2) == -3

    def test_big():
        assert add(10**20, 1) == 10**20 + 1

    def test_float():
        assert add(0.5, 0.25) == 0.75
    """)
TASK = {
    "id": "add",
    "instruction": "Implement add(a, b) in calc.py: return a + b for ints and floats.",
    "files": [{"path": "calc.py", "content": STUB}],
    "visible_tests": [{"path": "tests/test_calc.py",
                       "content": "from calc import add\n\ndef test_small():\n    assert add(1, 2) == 3\n"}],
    "hidden_tests": [{"path": "test_calc_hidden.py", "content": HIDDEN}],
    "solution": [{"path": "calc.py", "content": "def add(a, b):\n    return a + b\n"}],
}


def episode(calls: list[ToolCall], task=TASK, **kwargs):
    """Run reset, the calls, score, close; return (observations, score)."""

    async def go():
        env = CodingEnv(**kwargs)
        try:
            await env.reset(task)
            observations = []
            for call in calls:
                result = await env.step(call)
                observations.append(result.observation)
                if result.done:
                    break
            return observations, await env.score()
        finally:
            await env.close()

    return asyncio.run(go())


def write(path: str, content: str) -> ToolCall:
    return ToolCall("write_file", {"path": path, "content": content})


def test_reference_solution_scores_one_and_no_action_zero():
    _, best = episode(CodingEnv.reference_calls(TASK))
    assert best.reward == 1.0
    assert best.details["hidden_passed"] == 4 and best.details["hidden_total"] == 4
    assert best.details["submitted"] == 1.0
    _, none = episode([])
    assert none.reward == 0.0 and none.details["hidden_total"] == 4


def test_partial_solution_pass_fraction_and_all_pass():
    # Right for ints only: zero, negative and big pass, float fails -> 3/4.
    partial = write("calc.py", "def add(a, b):\n    return a + b if isinstance(a, int) else 0\n")
    _, s = episode([partial])
    assert s.reward == 0.75
    _, s = episode([partial], reward="all_pass")
    assert s.reward == 0.0 and s.details["pass_fraction"] == 0.75


def test_tools_bash_read_write_run_tests():
    obs, _ = episode([
        ToolCall("bash", {"command": "ls; echo oops >&2; exit 4"}),
        ToolCall("read_file", {"path": "calc.py"}),
        ToolCall("run_tests", {}),
        write("calc.py", "def add(a, b):\n    return a + b\n"),
        ToolCall("run_tests", {}),
    ])
    assert obs[0].startswith("[exit code 4]") and "calc.py" in obs[0] and "[stderr]\noops" in obs[0]
    assert obs[1] == STUB
    assert "1 failed" in obs[2] and "NotImplementedError" in obs[2]
    assert obs[3] == "wrote 32 bytes to calc.py"
    assert obs[4].startswith("[exit code 0]") and "1 passed" in obs[4]


def test_bad_calls_are_observations_and_counted():
    obs, s = episode([
        ToolCall("rm_rf", {}),
        ToolCall("bash", {}),
        ToolCall("bash", {"command": "ls", "sudo": True}),
        ToolCall("write_file", {"path": "big.txt", "content": "x" * (1 << 20)}),
        ToolCall("write_file", {"path": "a\udcff.py", "content": "x"}),
        ToolCall("read_file", {"path": "../../etc/passwd"}),
        ToolCall("read_file", {"path": "missing.py"}),
    ])
    assert obs[0].startswith("error: unknown tool 'rm_rf'")
    assert obs[1] == "error: bash: missing argument(s) command"
    assert obs[2] == "error: bash: unexpected argument(s) 'sudo'"
    assert "is 1048576 bytes; the limit is 65536" in obs[3]
    assert obs[4] == "error: write_file: argument 'path' is not valid UTF-8 text"
    assert obs[5].startswith("error:") and obs[6].startswith("error:")
    assert s.details["tool_errors"] == 7 and s.details["tool_calls"] == 7


def test_non_utf8_output_and_timeouts_reach_the_agent():
    obs, s = episode([
        ToolCall("bash", {"command": "printf 'a\\xff\\xfeb'"}),
        ToolCall("bash", {"command": "sleep 20"}),
    ], sandbox={"timeout_s": 1.0})
    assert obs[0] == "[exit code 0]\na\ufffd\ufffdb"
    assert "timed out: the command was killed" in obs[1]
    assert s.details["command_timeouts"] == 1


def test_the_agent_never_sees_the_hidden_tests():
    # A marker that exists only in this process's memory and in the hidden test: if relayrl wrote
    # the hidden tests anywhere the agent can read during its episode, grep would find it.
    token = secrets.token_hex(8)
    marker = f"marker_{token}"
    task = {**TASK, "hidden_tests": [{"path": "test_calc_hidden.py", "content": HIDDEN + f"\n# {marker}\n"}]}
    where = ". .. /tmp /var/tmp /dev/shm $HOME"
    # Control: the same grep finds a marker that is in the workspace, so a miss means absence.
    obs, s = episode([
        write("notes.txt", f"control_{token}"),
        ToolCall("bash", {"command": f'm=marker_; c=control_; grep -rl -e "${{m}}{token}" -e "${{c}}{token}" '
                                     f'{where} 2>/dev/null | xargs -n1 basename | sort -u; echo done'}),
    ], task=task)
    assert obs[1] == "[exit code 0]\nnotes.txt\ndone", obs[1]
    assert s.details["hidden_total"] == 4  # and the grader did find them


HACKS = {
    # An agent's conftest.py that turns every failure into a pass.
    "conftest": ("conftest.py", textwrap.dedent("""\
        import pytest

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_makereport(item, call):
            outcome = yield
            report = outcome.get_result()
            report.outcome = "passed"
        """)),
    # An ini file that loads a plug-in from the workspace which does the same.
    "pytest.ini": ("pytest.ini", "[pytest]\naddopts = -p no:warnings -p hackplugin\n"),
    "pyproject": ("pyproject.toml", "[tool.pytest.ini_options]\naddopts = '-p hackplugin'\n"),
    # A sitecustomize that would run first in any interpreter started in the workspace.
    "sitecustomize": ("sitecustomize.py", "import builtins\nbuiltins.NotImplementedError = type('X', (Exception,), {})\n"
                                           "import calc\ncalc.add = lambda a, b: a + b\n"),
}
PLUGIN = ("hackplugin.py", HACKS["conftest"][1])


@pytest.mark.parametrize("name", sorted(HACKS))
def test_grader_ignores_workspace_pytest_config_and_startup_hooks(name):
    path, content = HACKS[name]
    obs, s = episode([write(*PLUGIN), write(path, content), ToolCall("run_tests", {})])
    if name in ("conftest", "pytest.ini", "pyproject"):
        # The hack is real: the agent's own pytest run now reports the failing visible test as passed ...
        assert "1 passed" in obs[2], obs[2]
    # ... but the grader does not load it: the stub still scores 0.
    assert s.reward == 0.0 and s.details["hidden_total"] == 4


def test_editing_the_visible_tests_changes_nothing():
    _, s = episode([write("tests/test_calc.py", "def test_ok():\n    pass\n")])
    assert s.reward == 0.0


def test_close_leaves_no_workspace(tmp_path):
    async def go():
        env = CodingEnv(sandbox={"root": str(tmp_path)})
        await env.reset(TASK)
        assert any(tmp_path.iterdir())
        await env.score()
        await env.close()
        await env.close()
        return list(tmp_path.iterdir())

    assert asyncio.run(go()) == []


def test_junit_counts():
    xml = (b'<testsuites><testsuite tests="3"><testcase name="a"/><testcase name="b"><failure/></testcase>'
           b'<testcase name="c"><skipped/></testcase></testsuite></testsuites>')
    assert junit_counts(xml) == (1, 3)
    assert junit_counts(b"") == (0, 0)
    assert junit_counts(b"<not xml") == (0, 0)


@pytest.mark.parametrize("bad, message", [
    ({**TASK, "instruction": " "}, "'instruction' must be non-empty"),
    ({**TASK, "hidden_tests": []}, "'hidden_tests' is empty"),
    ({**TASK, "files": [{"path": "a.py"}]}, "files[0] must be {path: str, content: str}"),
    ({**TASK, "visible_tests": [{"path": "test_x.py", "content": ""}]}, "must be under tests/"),
])
def test_check_task_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=None) as e:
        CodingEnv.check_task(bad)
    assert message in str(e.value)


def test_a_nul_byte_in_a_command_is_an_error_observation():
    # An argv cannot carry a NUL byte: the agent sees why, and the episode goes on.
    obs, s = episode([ToolCall("bash", {"command": "echo a\x00b"}), ToolCall("bash", {"command": "echo alive"})])
    assert obs[0] == ("[exit code 2]\n[stderr]\nrelayrl sandbox: the command holds a NUL byte (\\0), which no command "
                      "line can carry; nothing was run")
    assert obs[1] == "[exit code 0]\nalive"
    assert s.details["hidden_total"] == 4


DEPTH = 1500
MAKE_DEEP = f"""import os
for _ in range({DEPTH}):
    os.mkdir("dd")
    os.chdir("dd")
open("f", "w").write("deep")
"""


def test_a_1500_level_tree_is_scored_and_removed(tmp_path):
    # One command makes 1,500 levels (a path of 4,500 bytes, past PATH_MAX), one write_file
    # another; scoring copies both into the grader, and close removes everything.
    deep_file = "w/" + "d/" * DEPTH + "f.txt"

    async def go():
        env = CodingEnv(sandbox={"root": str(tmp_path), "timeout_s": 30})
        try:
            await env.reset(TASK)
            await env.step(write("mk.py", MAKE_DEEP))
            made = await env.step(ToolCall("bash", {"command": "python mk.py && find dd -name f | wc -l"}))
            wrote = await env.step(write(deep_file, "deep"))
            await env.step(write("calc.py", "def add(a, b):\n    return a + b\n"))
            score = await env.score()
        finally:
            await env.close()
        return made.observation, wrote.observation, score, list(tmp_path.iterdir())

    made, wrote, score, left = asyncio.run(go())
    assert made == "[exit code 0]\n1" and wrote == f"wrote 4 bytes to {deep_file}"
    assert score.reward == 1.0 and score.details["hidden_total"] == 4
    assert left == []


def test_task_file_paths_names_the_task_files_and_their_datasets_cache(tmp_path):
    from types import SimpleNamespace

    from datasets import config as datasets_config

    from relayrl.envs.coding import task_file_paths

    train, held = tmp_path / "train.jsonl", tmp_path / "real_heldout.jsonl"
    train.write_text("{}\n")
    held.write_text("{}\n")
    link = tmp_path / "heldout.jsonl"
    link.symlink_to(held)
    paths = task_file_paths(SimpleNamespace(tasks=str(train)), SimpleNamespace(tasks=str(link)))
    assert paths == [str(train), str(link), str(held), str(datasets_config.HF_DATASETS_CACHE)]
    # Task-set names and no tasks at all name no file: nothing to hide.
    assert task_file_paths(SimpleNamespace(tasks="pyfunc:train"), SimpleNamespace(tasks=None)) == []
    assert task_file_paths(SimpleNamespace(tasks=None)) == []
