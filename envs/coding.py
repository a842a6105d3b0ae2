"""The coding-agent environment: a task's workspace in a sandbox, five tools, hidden tests.

A task (schema in ``envs/tasks/README.md``) is a workspace snapshot, an instruction, visible
tests and hidden tests. An episode::

    reset(task)   a fresh sandbox holding the task's files and its visible tests (under tests/)
    step(call)    bash | read_file | write_file | run_tests | submit, checked before they run
    score()       the hidden tests, run on a clean copy of the final workspace
    close()       every sandbox closed, no process left

That is the agent mode. The single-turn code mode (``mode="code"``) asks for the whole code
file in one reply instead: one tool, ``answer(text)`` (the ``plain`` parser's), whose fenced
```` ```python ```` block is written over the task's code file before the same hidden tests run.
The system prompts name no tool-call syntax: the parser's format instructions, which the agent
loop's ``ChatFormat`` adds to the system message, say how to act.

What scoring guards against, and what it does not
-------------------------------------------------
The agent never sees the hidden tests: they exist only in a second sandbox, created after the
agent's last command, under a directory name drawn at random. That sandbox starts from a
snapshot of the agent's files, so nothing the agent left running can touch it. pytest runs
with ``python -I`` (no PYTHON* variables, no user site, the workspace is not on ``sys.path``
until pytest adds it, so a ``sitecustomize.py`` or a module shadowing ``pytest`` in the
workspace is never imported first), with ``--noconftest`` (an agent's ``conftest.py`` cannot
rewrite outcomes) and with our own ini file via ``-c`` (an agent's ``pytest.ini``,
``pyproject.toml``, ``tox.ini`` or ``setup.cfg`` cannot add options or plug-ins). Edits to the
visible tests change nothing: only hidden tests count.

Not covered here: the agent's module is imported by the hidden tests, so code in it runs inside
the scoring pytest process and can tamper with pytest from within (patching its reporting, for
one). Catching that is the anti-hack gate's work (rules + judge on every tool call), and the
scoring sandbox still bounds what such code can reach.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import secrets
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from relayrl.fences import fenced_blocks
from relayrl.registry import envs, import_dotted
from relayrl.types import ToolCall

from .base import Reset, Score, StepResult
from .sandbox import ExecResult, Sandbox, SandboxError, SandboxLimits, SandboxPathError, SandboxProvider
from .tools import Param, Tool, check_call

TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("bash", "Run a shell command (bash -c) in the workspace root. No network.",
         (Param("command", "string", "The command line."),)),
    Tool("read_file", "Read a text file of the workspace.",
         (Param("path", "string", "Path relative to the workspace root."),)),
    Tool("write_file", "Create or overwrite a file of the workspace with the given content.",
         (Param("path", "string", "Path relative to the workspace root."),
          Param("content", "string", "The whole new content of the file."))),
    Tool("run_tests", "Run the visible tests (tests/ in the workspace) with pytest."),
    Tool("submit", "Finish: your workspace is final and will be graded."),
)}

CODE_TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("answer", "Your reply: the complete code file in one fenced ```python block.",
         (Param("text", "string", "The reply text."),)),
)}

SYSTEM_PROMPT = (
    "You are a careful software engineer working in a sandboxed workspace with no network. "
    "Take one action per reply: inspect the files, change them and run the tests. Solve the task "
    "in the code itself; do not change or special-case the tests. When the task is done, submit."
)

CODE_SYSTEM_PROMPT = (
    "You are a careful software engineer. Solve the task in the code itself: hidden tests will "
    "check the file you write."
)

CODE_LANGUAGES = ("python", "py", "python3", "")

SHIPPED_TASKS = Path(__file__).parent / "tasks" / "python_tasks.jsonl"

VISIBLE_TEST_COMMAND = "python -m pytest -q -p no:cacheprovider tests"

TASK_FILE_LISTS = ("files", "visible_tests", "hidden_tests", "solution")


def make_sandbox_provider(spec: dict[str, Any] | None, hidden_paths: list[str] | None = None) -> SandboxProvider:
    """A provider from ``env.kwargs.sandbox``.

    ``{kind: local, root, hidden_paths, <SandboxLimits fields>}`` (the default), ``{kind: remote,
    url, token}``, or ``{kind: "my_pkg.mod:MyProvider", ...}`` whose remaining keys are its
    constructor's kwargs. ``hidden_paths`` (files and directories covered by an empty mount in
    every command; the coding env passes its task files) add to the spec's own; a remote
    server hides what its own host needs hidden, and a custom provider gets none.
    Raises ValueError naming the key: an unknown key with the known ones, a limit out of range,
    a ``kind`` that cannot be imported. The coding env's ``preflight`` calls this at start-up,
    so a typo stops the run before anything starts.
    """
    key = "env.kwargs.sandbox"
    spec = dict(spec or {})
    kind = spec.pop("kind", "local")
    if kind == "local":
        from .local_sandbox import LocalSandboxProvider

        root = spec.pop("root", None)
        hidden = spec.pop("hidden_paths", None) or []
        if not isinstance(hidden, list) or not all(isinstance(p, str) and p for p in hidden):
            raise ValueError(f"{key}.hidden_paths: must be a list of paths, got {hidden!r}")
        known = list(SandboxLimits.__dataclass_fields__)
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {', '.join(unknown)} for a local sandbox; the known keys "
                             f"are kind, root, hidden_paths and the limits {', '.join(known)}")
        try:
            limits = SandboxLimits(**spec)
        except ValueError as e:
            raise ValueError(f"{key}.{e}") from None  # the message starts with the field's name
        return LocalSandboxProvider(limits=limits, root=root, hidden_paths=[*hidden, *(hidden_paths or [])])
    if kind == "remote":
        from .remote_sandbox import RemoteSandboxProvider

        known = list(inspect.signature(RemoteSandboxProvider).parameters)
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {', '.join(unknown)} for a remote sandbox; the known keys "
                             f"are kind, {', '.join(known)}")
        if "url" not in spec:
            raise ValueError(f"{key}.url: a remote sandbox needs a url, e.g. {{kind: remote, url: http://host:8700}}")
        return RemoteSandboxProvider(**spec)
    if isinstance(kind, str) and ("." in kind or ":" in kind):
        try:
            provider_cls = import_dotted(kind)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{key}.kind: cannot import {kind!r} ({e}); check that the module is installed or on "
                             "PYTHONPATH and the name is spelled 'package.module:Provider'") from None
        try:
            return provider_cls(**spec)
        except TypeError as e:
            raise ValueError(f"{key}: the sandbox provider {kind!r} rejected its arguments {spec}: {e}") from None
    raise ValueError(f"{key}.kind: {kind!r} is not local, remote or a dotted path 'pkg.mod:Provider'")


def _file_list(task: dict[str, Any], key: str) -> dict[str, str]:
    entries = task.get(key) or []
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("content"), str):
            raise ValueError(f"task {task.get('id')!r}: {key}[{i}] must be {{path: str, content: str}}")
        out[entry["path"]] = entry["content"]
    return out


@envs.register("coding")
class CodingEnv:
    """Solve a Python task in a sandbox; scored by hidden tests.

    Args:
        mode: ``agent`` (default): the five tools, many turns, the episode ends with ``submit``.
            ``code``: one turn; the first message holds the instruction and the code file's
            current content (the stub) and asks for the complete file in one fenced
            ```` ```python ```` block; the one tool is ``answer(text)``, so it pairs with
            ``rollout.parser: plain`` (the whole reply is the text) and ``rollout.max_turns: 1``.
            The code is the reply's first ``python``/``py``/unlabelled fenced block (a block left
            open at the end counts), else the whole reply if it parses as Python with a
            statement that is not a bare expression; it replaces the code file and the episode
            is done. The code file is the task's ``code_file``, else its only ``.py`` file
            outside tests/. Score details add ``code_found``. ``write_file`` of the code file is
            accepted too (its content is the code), so ``reference_calls`` and the env contract
            check work in this mode, and so does a ``markdown`` reply that names the file
            (```` ```python rle.py ````); but ``plain`` is the parser this mode is written for:
            the markdown format cannot express ``answer`` and treats a path-less
            ```` ```python ```` block as a format error by design.
        sandbox: the sandbox provider spec (see ``make_sandbox_provider``); limits apply per command.
        hidden_paths: files and directories no sandbox command can read (covered by an empty
            mount): the job passes the task files of ``env.tasks`` and ``eval.tasks``
            (``task_file_paths``), since they hold the hidden tests and reference solutions.
        reward: ``pass_fraction`` (hidden tests passed / run) or ``all_pass`` (1 only if all pass).
        max_argument_bytes: the largest tool argument accepted (a longer one is an error observation).
        max_read_bytes: ``read_file`` returns at most this many bytes (with a marker if cut).
        test_timeout_s: wall clock for the visible tests (``run_tests``) and the hidden tests.
        system_prompt: replaces the default system message (of either mode).
    """

    requires_action = True
    """A reply without a tool call is a format error, not a final answer: the final answer is
    ``submit`` (agent mode) or ``answer`` (code mode). Read by the agent loop."""

    def __init__(self, sandbox: dict[str, Any] | None = None,
                 reward: Literal["pass_fraction", "all_pass"] = "pass_fraction",
                 max_argument_bytes: int = 64 << 10, max_read_bytes: int = 16 << 10,
                 test_timeout_s: float = 60.0, system_prompt: str | None = None,
                 mode: Literal["agent", "code"] = "agent", hidden_paths: list[str] | None = None) -> None:
        if mode not in ("agent", "code"):
            raise ValueError(f"mode must be 'agent' or 'code', not {mode!r}")
        if reward not in ("pass_fraction", "all_pass"):
            raise ValueError(f"reward must be 'pass_fraction' or 'all_pass', not {reward!r}")
        if max_argument_bytes <= 0 or max_read_bytes <= 0 or test_timeout_s <= 0:
            raise ValueError("max_argument_bytes, max_read_bytes and test_timeout_s must be > 0")
        if sandbox is not None and not isinstance(sandbox, dict):
            raise ValueError("sandbox must be a mapping like {kind: local, timeout_s: 30}")
        self.mode = mode
        self.tools = TOOLS if mode == "agent" else CODE_TOOLS
        if hidden_paths is not None and (not isinstance(hidden_paths, (list, tuple))
                                         or not all(isinstance(p, str) and p for p in hidden_paths)):
            raise ValueError(f"hidden_paths must be a list of paths, not {hidden_paths!r}")
        self.sandbox_spec = sandbox
        self.hidden_paths = list(hidden_paths or [])
        self.reward_kind = reward
        self.max_argument_bytes = max_argument_bytes
        self.max_read_bytes = max_read_bytes
        self.test_timeout_s = test_timeout_s
        self.system_prompt = system_prompt or (SYSTEM_PROMPT if mode == "agent" else CODE_SYSTEM_PROMPT)
        self._provider: SandboxProvider | None = None
        self._sandbox: Sandbox | None = None
        self._task: dict[str, Any] = {}
        self._counts: dict[str, float] = {}
        self._submitted = False
        self._code_file = ""
        self._code_found = False

    # ---- tasks ----

    @staticmethod
    def default_tasks(seed: int = 0) -> list[dict[str, Any]]:
        """The Python tasks shipped with relayrl (``envs/tasks/python``)."""
        with SHIPPED_TASKS.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    @staticmethod
    def check_task(task: dict[str, Any]) -> None:
        """Raise ValueError naming what is wrong with a task (run on every task at start-up)."""
        if not isinstance(task.get("id"), str) or not task["id"]:
            raise ValueError("a task needs a non-empty string 'id'")
        if not isinstance(task.get("instruction"), str) or not task["instruction"].strip():
            raise ValueError(f"task {task['id']!r}: 'instruction' must be non-empty text")
        for key in TASK_FILE_LISTS:
            _file_list(task, key)
        if not task.get("hidden_tests"):
            raise ValueError(f"task {task['id']!r}: 'hidden_tests' is empty; the reward comes from them")
        for entry in task.get("visible_tests") or []:
            if not entry["path"].startswith("tests/"):
                raise ValueError(f"task {task['id']!r}: visible test {entry['path']!r} must be under tests/")
        code = task.get("code_file")
        if code is not None and (not isinstance(code, str) or code not in _file_list(task, "files")):
            raise ValueError(f"task {task['id']!r}: 'code_file' must be the path of one of its files, not {code!r}")

    @staticmethod
    def reference_calls(task: dict[str, Any]) -> list[ToolCall] | None:
        """Tool calls that write the task's reference solution and submit (None if it has none)."""
        solution = _file_list(task, "solution") if task.get("solution") else {}
        if not solution:
            return None
        calls = [ToolCall("write_file", {"path": p, "content": c}) for p, c in sorted(solution.items())]
        return calls + [ToolCall("submit", {})]

    async def preflight(self) -> list[str]:
        """Before a run: the sandbox starts and can run pytest with the tests' interpreter.

        Returns warnings (no network isolation, limits per process only); raises ValueError
        naming the cause on a problem no episode could get past, so the run stops at start-up
        with it instead of failing every episode.
        """
        provider = make_sandbox_provider(self.sandbox_spec, self.hidden_paths)
        try:
            sandbox = await provider.create({})
            try:
                result = await sandbox.exec("python -c 'import pytest'", timeout=60)
            finally:
                await sandbox.close()
            if not result.ok:
                raise ValueError(f"the sandbox cannot run pytest (exit code {result.exit_code}, "
                                 f"timed out: {result.timed_out}): {_why_no_pytest(provider, result)} "
                                 f"Its output: {(result.stderr or result.stdout)[-600:].strip()}")
            warnings = []
            if not getattr(provider, "network_isolated", False):
                warnings.append("sandbox commands are NOT network-isolated on this host (no network namespace): "
                                "the policy's code can reach the network. Metrics show env/network_isolated=0.")
            if getattr(provider, "cgroup_limits", None) is False:
                warnings.append("sandbox memory and CPU-time limits hold per process only on this host (no "
                                "usable cgroup): a command's processes together can use more. Metrics show "
                                "env/cgroup_limits=0.")
            return warnings
        except SandboxError as e:
            raise ValueError(f"the sandbox does not work: {e}") from None
        finally:
            await provider.close()

    # ---- episode ----

    @property
    def sandbox(self) -> Sandbox | None:
        """The episode's sandbox (after ``reset``): black-box agent harnesses run in it, so
        ``score`` grades what they did (``rollout/blackbox.py``)."""
        return self._sandbox

    async def reset(self, task: dict[str, Any]) -> Reset:
        self.check_task(task)
        self._task = task
        self._counts = {"tool_calls": 0.0, "tool_errors": 0.0, "command_timeouts": 0.0}
        self._submitted = False
        self._code_found = False
        if self.mode == "code":
            self._code_file = code_file(task)
        self._provider = make_sandbox_provider(self.sandbox_spec, self.hidden_paths)
        files = {**_file_list(task, "files"), **_file_list(task, "visible_tests")}
        self._sandbox = await self._provider.create(files)
        if self.mode == "code":
            stub = files.get(self._code_file)
            current = (f"The current content of {self._code_file}:\n```python\n{stub.rstrip()}\n```"
                       if stub is not None else f"{self._code_file} does not exist yet.")
            user = (f"{task['instruction'].strip()}\n\n{current}\n\nReply with the complete new content of "
                    f"{self._code_file} in one fenced ```python block.")
        else:
            listing = "\n".join(f"- {p}" for p in sorted(files))
            user = f"{task['instruction'].strip()}\n\nFiles in the workspace:\n{listing}"
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        return Reset(messages=messages, tools=[t.schema() for t in self.tools.values()])

    async def step(self, call: ToolCall) -> StepResult:
        assert self._sandbox is not None, "step() before reset()"
        self._counts["tool_calls"] += 1
        accepted = self.tools if self.mode == "agent" else {**CODE_TOOLS, "write_file": TOOLS["write_file"]}
        problem = check_call(call, accepted, self.max_argument_bytes)
        if problem is None and self.mode == "code" and call.name == "write_file" \
                and call.arguments["path"] != self._code_file:
            problem = f"write_file: code mode writes only {self._code_file}"
        if problem is not None:
            self._counts["tool_errors"] += 1
            return StepResult(observation=f"error: {problem}", info={"tool_error": True})
        args = call.arguments
        if call.name == "answer":
            return await self._answer(extract_code(args["text"]))
        if self.mode == "code":  # write_file of the code file: the code itself
            return await self._answer(args["content"])
        if call.name == "submit":
            self._submitted = True
            return StepResult(observation="submitted", done=True)
        if call.name == "bash":
            return StepResult(observation=self._exec_observation(await self._sandbox.exec(args["command"])))
        if call.name == "run_tests":
            result = await self._sandbox.exec(VISIBLE_TEST_COMMAND, timeout=self.test_timeout_s)
            return StepResult(observation=self._exec_observation(result))
        try:
            if call.name == "read_file":
                data = await self._sandbox.read_file(args["path"])
                return StepResult(observation=self._clip(data))
            await self._sandbox.write_file(args["path"], args["content"])
            return StepResult(observation=f"wrote {len(args['content'].encode('utf-8'))} bytes to {args['path']}")
        except SandboxPathError as e:
            self._counts["tool_errors"] += 1
            return StepResult(observation=f"error: {e}", info={"tool_error": True})

    async def _answer(self, code: str | None) -> StepResult:
        """Code mode: ``code`` (None: the reply held none) replaces the code file; the episode is
        done either way."""
        assert self._sandbox is not None
        self._submitted = True
        self._code_found = code is not None
        if code is None:
            return StepResult(observation="no code found: nothing was written", done=True)
        try:
            await self._sandbox.write_file(self._code_file, code)
        except SandboxPathError as e:  # a task whose code_file is not a workspace path
            self._counts["tool_errors"] += 1
            return StepResult(observation=f"error: {e}", done=True, info={"tool_error": True})
        return StepResult(observation=f"wrote {len(code.encode('utf-8'))} bytes to {self._code_file}", done=True)

    async def score(self) -> Score:
        assert self._sandbox is not None and self._provider is not None, "score() before reset()"
        start = time.monotonic()
        final = await self._sandbox.snapshot()
        await self._sandbox.close()  # nothing the agent started outlives its turn
        hidden_dir = f".grading_{secrets.token_hex(8)}"
        files: dict[str, bytes | str] = dict(final)
        for path, content in _file_list(self._task, "hidden_tests").items():
            files[f"{hidden_dir}/{path}"] = content
        # pytest reads ini paths relative to the ini file: ".." is the workspace root.
        files[f"{hidden_dir}/pytest.ini"] = "[pytest]\npythonpath = ..\n"
        grader = await self._provider.create(files)
        try:
            result = await grader.exec(
                f"python -I -m pytest -q -p no:cacheprovider --noconftest -c {hidden_dir}/pytest.ini "
                f"--rootdir=. --junitxml={hidden_dir}/report.xml {hidden_dir}",
                timeout=self.test_timeout_s)
            try:
                report = await grader.read_file(f"{hidden_dir}/report.xml")
            except SandboxPathError:
                report = b""
        finally:
            await grader.close()
        passed, total = junit_counts(report)
        fraction = passed / total if total else 0.0
        all_pass = float(total > 0 and passed == total)
        reward = fraction if self.reward_kind == "pass_fraction" else all_pass
        details = {
            **self._counts,
            "hidden_passed": float(passed), "hidden_total": float(total),
            "pass_fraction": fraction, "all_pass": all_pass,
            "submitted": float(self._submitted),
            "grading_timed_out": float(result.timed_out),
            "grading_no_report": float(not report),
            "network_isolated": float(getattr(self._provider, "network_isolated", False)),
            "cgroup_limits": float(bool(getattr(self._provider, "cgroup_limits", False))),
            "score_seconds": time.monotonic() - start,
        }
        if self.mode == "code":
            details["code_found"] = float(self._code_found)
        return Score(reward=reward, details=details)

    async def close(self) -> None:
        if self._sandbox is not None:
            await self._sandbox.close()
        if self._provider is not None:
            await self._provider.close()
        self._sandbox = self._provider = None

    # ---- observations ----

    def render_dummy(self, call: ToolCall, dummy: Any) -> str:
        """A blocked call's dummy output, shaped like this tool's real output."""
        if dummy.error is not None:
            return f"error: {dummy.error}"
        if dummy.exit_code is not None:
            if call.name != "bash":  # a command-shaped dummy for a file tool: its error text
                return f"error: {(dummy.stderr or dummy.stdout).strip() or 'operation not permitted'}"
            return self._exec_observation(ExecResult(dummy.exit_code, dummy.stdout, dummy.stderr))
        return dummy.text

    def _exec_observation(self, result: ExecResult) -> str:
        if result.timed_out:
            self._counts["command_timeouts"] += 1
        head = f"[exit code {result.exit_code}" + (", timed out: the command was killed" if result.timed_out else "") + "]"
        parts = [head]
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
        return "\n".join(parts)

    def _clip(self, data: bytes) -> str:
        if len(data) <= self.max_read_bytes:
            return data.decode("utf-8", errors="replace")
        kept = data[: self.max_read_bytes].decode("utf-8", errors="ignore")
        return kept + f"\n[... file truncated: {len(data) - self.max_read_bytes} more bytes; use bash (sed -n) to read a range ...]"


def _why_no_pytest(provider: Any, result: ExecResult) -> str:
    """The likely cause of a failed ``python -c 'import pytest'`` in a fresh sandbox, and the fix."""
    python = getattr(provider, "python", None)  # a local provider's interpreter
    which = f" ({python})" if python else ""
    if result.timed_out:
        return "the check ran out of time: raise env.kwargs.sandbox.timeout_s, or the host is overloaded."
    if result.exit_code == 127:
        return (f"`python`{which} is not found inside the sandbox: its directories are hidden there or it is "
                "not on the sandbox's PATH (a local sandbox binds the interpreter's prefix, virtualenv and "
                "site-packages back read-only, except under /run; is one of them in env.kwargs.sandbox."
                "hidden_paths?). On a remote sandbox server, install python there.")
    if result.exit_code == 126:
        return (f"`python`{which} cannot be run by the sandbox's own uid: make its directories readable and "
                "searchable by others (chmod o+rx), or run relayrl from an interpreter installed so.")
    if "No module named" in result.stderr:
        return f"pytest is not installed for the sandbox's interpreter{which}: pip install pytest into it."
    if result.exit_code in (128 + 9, 128 + 24) or "MemoryError" in result.stderr:
        return ("python was killed by the sandbox's limits: raise env.kwargs.sandbox.memory_bytes, cpu_seconds "
                "or max_processes.")
    return "see its output below."


def task_file_paths(env_cfg: Any, eval_cfg: Any = None) -> list[str]:
    """The files a job's sandboxes must hide: those of ``env.tasks`` and ``eval.tasks`` that
    name files or directories on this host (task-set names such as ``pyfunc:train`` are made
    by code the sandbox already hides), each as given and resolved, and the ``datasets`` cache
    that loading them fills (it holds a copy)."""
    out: list[str] = []
    for cfg in (env_cfg, eval_cfg):
        tasks = getattr(cfg, "tasks", None)
        if not isinstance(tasks, str) or not tasks or not os.path.exists(tasks):
            continue
        out += [p for p in dict.fromkeys((os.path.abspath(tasks), os.path.realpath(tasks))) if p not in out]
    if out:
        try:
            from datasets import config as datasets_config

            cache = str(datasets_config.HF_DATASETS_CACHE)
            if cache not in out:
                out.append(cache)
        except ImportError:
            pass
    return out


def code_file(task: dict[str, Any]) -> str:
    """The file a single-turn answer replaces: the task's ``code_file``, else its only ``.py``
    file outside tests/; ValueError naming ``code_file`` if that is not one file."""
    if task.get("code_file"):
        return str(task["code_file"])
    candidates = sorted(p for p in _file_list(task, "files") if p.endswith(".py") and not p.startswith("tests/"))
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise ValueError(f"task {task.get('id')!r}: code mode needs the task's 'code_file' (the file the answer "
                         f"replaces) when 'files' does not hold exactly one .py file outside tests/ (found: {found})")
    return candidates[0]


def extract_code(reply: str) -> str | None:
    """The code of a single-turn reply, or None if it holds none.

    The first fenced block labelled ``python``/``py``/``python3`` or unlabelled (one left open at
    the end of the reply counts: generation may stop before the closing fence); without one,
    the whole reply if it parses as Python and has a statement that is not a bare expression
    (so prose that happens to parse, a lone word, is not code).
    """
    for block in fenced_blocks(reply):
        if block.language in CODE_LANGUAGES and block.body.strip():
            return block.body
    try:
        tree = ast.parse(reply)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte
        return None
    if any(not isinstance(node, ast.Expr) for node in tree.body):
        return reply.strip("\n") + "\n"
    return None


def junit_counts(report: bytes) -> tuple[int, int]:
    """(passed, total) test cases of a pytest junit XML report; (0, 0) if empty or unreadable.

    A test case passed when it has no failure, error or skipped child; a file that failed to
    import appears as one errored case.
    """
    if not report:
        return 0, 0
    try:
        root = ET.fromstring(report)
    except ET.ParseError:
        return 0, 0
    cases = root.findall(".//testcase")
    bad = {"failure", "error", "skipped"}
    passed = sum(1 for c in cases if not any(child.tag in bad for child in c))
    return passed, len(cases)
