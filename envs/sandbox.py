"""The ``Sandbox`` seam: where an agent's commands run.

A sandbox is one episode's isolated workspace: a directory of files and a way to run shell
commands in it. The coding env talks only to this protocol, so the same env runs on a local
sandbox (``envs/local_sandbox.py``: a workspace dir, a fresh network namespace, rlimits) or on a
remote sandbox server on another host (``envs/remote_sandbox.py``).

Two kinds of failure are kept apart:

- a *command* that fails, loops, floods output or is killed is a normal result
  (``ExecResult`` with its exit code, ``timed_out``, ``truncated``): the agent sees it;
- the *sandbox* itself failing (server gone, workspace lost) raises ``SandboxError``: the
  episode is marked failed with that error and the run goes on.

Paths given to ``read_file``/``write_file`` are relative to the workspace root; a path that
escapes it (``..``, absolute, through a symlink) raises ``SandboxPathError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable


class SandboxError(RuntimeError):
    """The sandbox itself failed (not a command in it): the episode cannot go on."""


class SandboxPathError(ValueError):
    """A path outside the workspace, or not a file."""


TRUNCATION_MARKER = "\n[... output truncated: {dropped} bytes dropped ...]\n"
"""Inserted where output was cut, so the agent (and a reader) can see that it was."""


@dataclass
class ExecResult:
    """What a command did.

    exit_code: the command's exit status as a shell reports it: ``128 + N`` when killed by
        signal N (SIGKILL from a memory or process limit: 137; SIGXCPU from the CPU limit: 152).
        A command killed at its timeout reports ``-9`` with ``timed_out=True``.
    stdout / stderr: decoded as UTF-8 with invalid bytes replaced, each cut to the sandbox's
        output limit with ``TRUNCATION_MARKER`` where bytes were dropped.
    """

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass
class SandboxLimits:
    """Resource limits of every command run in a sandbox (per command, enforced by the OS).

    cpu_seconds: RLIMIT_CPU. memory_bytes: RLIMIT_AS (address space). max_processes: the
    processes/threads a command may have at once. max_file_bytes: RLIMIT_FSIZE, the largest
    file a command may write. max_open_files: RLIMIT_NOFILE. timeout_s: wall clock, after which
    the command's whole process group is killed. max_output_bytes: per stream, kept bytes
    (head and tail) of stdout and stderr. network: False = a fresh network namespace with no
    interfaces but loopback (down). loopback: bring that namespace's own loopback up, so the
    processes of one command can talk to each other over 127.0.0.1 (the black-box proxy's
    in-sandbox forwarder needs it); the host and other sandboxes stay unreachable, since each
    command has a namespace of its own.
    """

    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 64
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    timeout_s: float = 30.0
    max_output_bytes: int = 32 << 10
    network: bool = False
    loopback: bool = False

    def __post_init__(self) -> None:
        """Reject a value the OS would turn into a baffling failure (a negative timeout kills
        every command at once, a string limit makes prlimit fail, so the sandbox looks broken):
        ValueError naming the field, ``"<field>: must be ..."``, so a caller can prefix where the
        spec came from (``env.kwargs.sandbox.``)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: must be true or false, got {value!r}")
                continue
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{f.name}: must be a positive number of seconds, got {value!r}")
                continue
            unit = _INT_UNITS[f.name]
            if isinstance(value, bool) or not isinstance(value, int):
                example = " (e.g. 1073741824 for 1 GiB)" if f.name == "memory_bytes" else ""
                raise ValueError(f"{f.name}: must be a whole number{unit}{example}, got {value!r}")
            if value <= 0:
                raise ValueError(f"{f.name}: must be a positive whole number{unit}, got {value!r}")


_INT_UNITS = {"cpu_seconds": " of seconds", "memory_bytes": " of bytes", "max_processes": "",
              "max_file_bytes": " of bytes", "max_open_files": "", "max_output_bytes": " of bytes"}
"""The unit each integer limit of ``SandboxLimits`` is counted in, for its error message."""


@runtime_checkable
class Sandbox(Protocol):
    """One isolated workspace. All methods are async; ``close`` is idempotent and leaves no
    process behind."""

    async def exec(self, cmd: str, timeout: float | None = None) -> ExecResult:
        """Run ``cmd`` with ``bash -c`` in the workspace root. ``timeout`` (seconds) may only
        lower the sandbox's ``timeout_s``."""
        ...

    async def write_file(self, path: str, data: bytes | str) -> None:
        """Create or replace a file (parents created). ``str`` is written as UTF-8."""
        ...

    async def read_file(self, path: str) -> bytes:
        """A file's bytes; ``SandboxPathError`` if missing, a directory or outside the workspace."""
        ...

    async def snapshot(self) -> dict[str, bytes]:
        """Every regular file in the workspace, by relative path (symlinks are not followed)."""
        ...

    async def close(self) -> None:
        """Kill every process the sandbox started and delete the workspace."""
        ...


@runtime_checkable
class SandboxProvider(Protocol):
    """Creates sandboxes: one per episode, and one more for scoring a clean copy."""

    async def create(self, files: dict[str, bytes | str] | None = None) -> Sandbox:
        """A fresh sandbox whose workspace holds ``files`` (relative path -> content)."""
        ...

    async def close(self) -> None:
        """Release shared resources (HTTP sessions); sandboxes still open are closed too."""
        ...
