"""Local sandboxes: one workspace directory per episode, every command in fresh namespaces.

Threat model
------------
The policy under training writes and runs arbitrary code, and RL pushes it toward whatever
raises its reward, shortcuts included. On a host where relayrl runs as root (the usual case in
containers and on GPU nodes) each command runs like this::

    join the sandbox's cgroup (envs/cgroups.py)   memory, processes, CPU time over all processes
    unshare --mount --net --ipc --pid --fork --kill-child --mount-proc   (new namespaces)
      private tmpfs on /tmp, /var/tmp, /dev/shm, /run (and /var/run where it is not a link to
      /run); empty mounts over /root, /home, relayrl's env code and shipped tasks, the
      checkout's .git and the ``hidden_paths`` (the coding env's task files); then the
      interpreter's own directories are bound back read-only where they lay under one of these
      (a virtualenv under /tmp or /root works)
      setpriv: a uid of its own (one per sandbox), no groups, no capabilities, no_new_privs
      prlimit: CPU seconds, address space, processes, file size, open files, no core files
      bash -c COMMAND, in the workspace

What it protects against, one property per attack test (``tests/test_sandbox_attacks.py``):

- network access: the network namespace has only a loopback interface, down (with
  ``SandboxLimits.loopback`` it is up, but the namespace is the command's own: 127.0.0.1 there
  reaches only the command's own processes, never the host's or another sandbox's); abstract
  unix sockets belong to the network namespace too;
- unix sockets in the filesystem: the usual directories for them (/run, /var/run, /tmp and
  its .X11-unix, /var/tmp, /dev/shm) are private mounts inside;
- System V IPC and POSIX message queues: the IPC namespace is the command's own, so it sees
  none of the host's segments, semaphores and queues, and what it makes dies with it;
- fork bombs: the cgroup's pids.max, and RLIMIT_NPROC on a uid no other process has;
- memory hogs: the cgroup's memory limit over all the command's processes together (the
  kernel's OOM killer kills in the group, and stderr says so), and RLIMIT_AS per process;
- infinite loops: CPU time over all the command's processes, read from the cgroup and killed
  past ``cpu_seconds`` (exit code 152, as RLIMIT_CPU's SIGXCPU gives a single process), and a
  wall-clock timeout that kills the PID namespace's init, which makes the kernel kill every
  process in it;
- processes left behind: the same PID namespace ends when the command ends, so ``&``,
  ``nohup``, ``setsid`` and double forks die with it; ``close()`` deletes the workspace and
  the cgroup;
- output floods: output is read in chunks and only a head and a tail are kept, with a visible
  marker; the rest is counted and dropped, so memory stays bounded;
- huge files: RLIMIT_FSIZE;
- writing outside the workspace: the uid owns nothing else; system directories are not
  writable to it, /tmp and friends are private tmpfs mounts thrown away after the command,
  other sandboxes' workspaces are mode 0700 under other uids;
- reading what it must not: root's and users' homes (keys, tokens, caches), the task files
  (hidden tests, reference solutions; the coding env hides its ``env.tasks``/``eval.tasks``
  files), relayrl's env package (the shipped tasks and the task generator, which holds the
  references of generated tasks) and the checkout's ``.git`` (whose objects hold them too) are
  covered by empty mounts; host paths given to ``read_file``/``write_file`` are resolved
  without following symlinks, so a symlink the agent made cannot point them out;
- workspaces the host cannot walk: snapshots and removal work at any depth (a 1,500-level
  directory is scored and removed like any other);
- a command line that cannot be run (a NUL byte, text that is not UTF-8): an error result
  the agent sees, not an exception.

Where the host has no usable cgroup (``LocalSandboxProvider.cgroup_limits`` is False, and the
coding env reports ``env/cgroup_limits`` 0), memory and CPU time are bounded per process only:
N processes may hold N x ``memory_bytes`` and burn N x ``cpu_seconds``, up to the process limit.

What it does not protect against: kernel exploits (namespaces and cgroups are not a VM; use
remote sandboxes on separate hosts, or gVisor/VMs behind the ``Sandbox`` protocol, for hostile
code beyond RL policies); disk filling through many small files (no quota: put ``root`` on a
size-limited filesystem); timing and other side channels; reading world-readable host files
outside the hidden paths (the rest of the repository, site-packages, and any task copy you
keep elsewhere: hide it with ``hidden_paths``); a unix socket that a host service made
world-writable outside the directories above (``/var/lib/mysql/mysql.sock``, a socket in the
repository): hide its directory with ``hidden_paths``; an interpreter installed under /run
(the one private directory it cannot be bound back into).

Without root, the same namespaces are made through a user namespace (``unshare --user
--map-root-user``): network, IPC, PID and mount isolation hold, but there is no separate uid, so
RLIMIT_NPROC counts all the user's processes and the workspace is writable only through the
user's own permissions; cgroup limits hold only where the user was delegated a cgroup v2
subtree. Without namespaces at all (some hardened hosts), commands still run in their own
process group under rlimits (and the cgroup, where there is one, which also kills what they
leave running), but with network access, shared IPC and no hidden paths: the provider says so
loudly when it starts and ``network_isolated`` is False (the coding env puts it in the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from . import cgroups
from .trees import regular_files, remove_tree
from .sandbox import TRUNCATION_MARKER, ExecResult, SandboxError, SandboxLimits, SandboxPathError

log = logging.getLogger(__name__)

Mode = Literal["root", "userns", "none"]

UID_BASE = 1_500_000
"""Sandbox uids are drawn above every uid a distribution hands out, one per sandbox."""

ENVS_DIR = Path(__file__).resolve().parent
"""relayrl's env package: the shipped tasks (``tasks/``) and the task generator, whose code
holds the reference solutions of the tasks it makes."""

SHIPPED_TASKS_DIR = ENVS_DIR / "tasks"

PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/var/run")
"""Covered by a fresh tmpfs in every command (/run too, first, since the setup stages its
mounts there)."""

CPU_POLL_S = 0.1
"""How often a running command's CPU time (all its processes) is read from its cgroup."""

SETUP_PROCESSES = 2
"""Processes in a command's cgroup besides the command's own: ``unshare`` and the namespace's
init shell (the cgroup-joining shell and ``setpriv``/``prlimit`` exec into them)."""

# Runs as (namespace) root before the command: mounts, then drops to the sandbox uid and exec's
# the command under its rlimits. Arguments: workspace, uid ("" = keep), loopback ("1" = up),
# then "hide:PATH" / "keep:PATH" in the order to apply them, then "--", then the prlimit + bash
# argv. Keeps are bound to a stage first (before the tmpfs mounts cover them), moved back after.
_SETUP = r"""
set -e
ws="$1"; uid="$2"; lo="$3"; shift 3
stage=/run/.relayrl-stage
mount -t tmpfs -o mode=0755,size=1m tmpfs /run
mkdir -p "$stage"
mkdir "$stage/ws" && mount --bind "$ws" "$stage/ws"
n=0
for a in "$@"; do
  [ "$a" = -- ] && break
  case "$a" in
    keep:*) n=$((n+1)); p="${a#keep:}"; if [ -d "$p" ]; then mkdir "$stage/k$n"; mount --bind "$p" "$stage/k$n"; fi;;
  esac
done
for d in /tmp /var/tmp /dev/shm /var/run; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o mode=1777,size=256m tmpfs "$d"; fi
done
n=0
for a in "$@"; do
  [ "$a" = -- ] && break
  case "$a" in
    hide:*) p="${a#hide:}"
      if [ -d "$p" ]; then mount -t tmpfs -o mode=0755,size=1m tmpfs "$p"
      elif [ -e "$p" ]; then mount --bind /dev/null "$p"; mount -o remount,bind,ro "$p" || true; fi;;
    keep:*) n=$((n+1)); p="${a#keep:}"
      if [ -d "$stage/k$n" ]; then
        mkdir -p "$p"; mount --move "$stage/k$n" "$p"; mount -o remount,bind,ro "$p" || true
      fi;;
  esac
done
while [ "$1" != -- ]; do shift; done
shift
mkdir -p "$ws"; mount --move "$stage/ws" "$ws"
rmdir "$stage"/k* 2>/dev/null || true; rmdir "$stage/ws" "$stage" 2>/dev/null || true
mount -o remount,ro,bind /run 2>/dev/null || true
if [ "$lo" = 1 ]; then
  ip link set lo up 2>/dev/null || "$PYTHON" -c "$LOOPBACK_UP" || { echo "relayrl sandbox: cannot bring up loopback" >&2; exit 125; }
fi
cd "$ws"
set +e
# Not exec'd: this shell stays the namespace's init and reports a signalled command as 128 + N.
if [ -n "$uid" ]; then
  setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
else
  "$@"
fi
exit $?
"""

# Joins the sandbox's cgroup(s), then exec's the rest: everything the command forks is inside.
# Arguments: the cgroup directories, "--", the command.
_JOIN = r"""
for d in "$@"; do
  [ "$d" = -- ] && break
  echo $$ > "$d/cgroup.procs" || { echo "relayrl sandbox: cannot join the cgroup $d" >&2; exit 125; }
done
while [ "$1" != -- ]; do shift; done
shift
exec "$@"
"""

# Where ``ip`` is missing: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP, on ``lo``.
_LOOPBACK_UP = ("import fcntl, socket, struct\n"
                "s = socket.socket()\n"
                "req = fcntl.ioctl(s, 0x8913, struct.pack('16sH22s', b'lo', 0, b''))\n"
                "flags = struct.unpack('16sH22s', req)[1]\n"
                "fcntl.ioctl(s, 0x8914, struct.pack('16sH22s', b'lo', flags | 1, b''))\n")

_NAMESPACES = ["unshare", "--mount", "--net", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc"]

_probe_cache: dict[str, Mode] = {}


def probe_mode() -> Mode:
    """Which isolation this host allows (checked once per process)."""
    if "mode" in _probe_cache:
        return _probe_cache["mode"]
    mode: Mode = "none"
    tools = all(shutil.which(t) for t in ("unshare", "prlimit", "mount"))
    ns = _NAMESPACES
    if tools and os.geteuid() == 0 and shutil.which("setpriv") and _runs(ns + ["mount", "-t", "tmpfs", "tmpfs", "/tmp"]):
        mode = "root"
    elif tools and _runs(["unshare", "--user", "--map-root-user"] + ns[1:] + ["mount", "-t", "tmpfs", "tmpfs", "/tmp"]):
        mode = "userns"
    if mode == "none":
        log.warning("relayrl sandboxes: this host allows no network/IPC/PID/mount namespaces (unshare failed); "
                    "commands will run with network access and background processes can escape. "
                    "Use remote sandboxes on a host that allows them for real isolation.")
    _probe_cache["mode"] = mode
    return mode


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_INTERPRETER_QUERY = (
    "import json, site, sys, sysconfig\n"
    "paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]\n"
    "paths += site.getsitepackages()\n"
    "paths += [sysconfig.get_path(k) for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')]\n"
    "user = site.getusersitepackages()\n"
    "paths += [user] if site.ENABLE_USER_SITE and user in sys.path else []\n"
    "print(json.dumps([p for p in paths if p]))\n")


def _ask_interpreter(python: str) -> list[str]:
    """What ``_INTERPRETER_QUERY`` prints when ``python`` runs it ([] if it cannot)."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        printed: list[str] = []
        exec(_INTERPRETER_QUERY, {"print": printed.append})  # noqa: S102 - our own code, in this interpreter
        return json.loads(printed[0])
    try:
        proc = subprocess.run([python, "-I", "-c", _INTERPRETER_QUERY], capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout) if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []


@functools.lru_cache(maxsize=16)
def interpreter_dirs(python: str, path: str) -> tuple[str, ...]:
    """The directories ``python`` (and the ``python``/``python3`` found on ``path``) need:
    prefixes, site-packages, the standard library, and the tree of every executable on the
    way through their symlinks, each as given and resolved."""
    found = _ask_interpreter(python)
    if not found:
        log.warning("relayrl sandboxes: could not ask %s for its directories; only its own tree is kept "
                    "visible inside the sandbox", python)
    dirs = set()
    for p in found:
        dirs |= {os.path.abspath(p), os.path.realpath(p)}
    for exe in (python, shutil.which("python", path=path), shutil.which("python3", path=path)):
        hop = exe
        for _ in range(40):  # bin/python -> ../x/bin/python3 -> python3.11: each hop's tree
            if not hop:
                break
            hop = os.path.abspath(hop)
            dirs.add(os.path.dirname(os.path.dirname(hop)))
            if not os.path.islink(hop):
                break
            hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return tuple(sorted(d for d in dirs if d and d != "/"))


def checkout_git_paths(repo: Path = ENVS_DIR.parent) -> list[str]:
    """The ``.git`` of the checkout relayrl runs from, if it does (its objects hold the shipped
    tasks' hidden tests): the directory, or for a worktree the ``.git`` file, its git dir and
    the common dir."""
    dot = repo / ".git"
    if dot.is_dir():
        return [str(dot)]
    if not dot.is_file():
        return []
    out = [str(dot)]
    try:
        text = dot.read_text(errors="replace").strip()
        if text.startswith("gitdir:"):
            gitdir = (repo / text[len("gitdir:"):].strip()).resolve()
            out.append(str(gitdir))
            common = gitdir / "commondir"
            if common.is_file():
                out.append(str((gitdir / common.read_text().strip()).resolve()))
    except OSError:
        pass
    return out


def _is_under(path: str, roots: set[str] | list[str], strictly: bool = False) -> bool:
    return any(path.startswith(r.rstrip("/") + "/") or (not strictly and path == r) for r in roots)


def command_problem(cmd: object) -> str | None:
    """Why ``cmd`` cannot be given to ``bash -c`` (None if it can): an argv cannot hold a NUL
    byte, nor a lone surrogate (text that came from no UTF-8 bytes)."""
    if not isinstance(cmd, str):
        return f"the command must be text, not {type(cmd).__name__}"
    if "\x00" in cmd:
        return "the command holds a NUL byte (\\0), which no command line can carry; nothing was run"
    try:
        os.fsencode(cmd)
    except UnicodeEncodeError as e:
        return (f"the command holds {cmd[e.start:e.end]!r} at offset {e.start}, which is not valid UTF-8 text; "
                "nothing was run")
    return None


def check_timeout(timeout: object, what: str = "timeout") -> float:
    """``timeout`` as seconds: a finite number > 0 (not a bool, not a string); ValueError if not."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"{what}: must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


class _Capture:
    """Keeps the first and last ``limit // 2`` bytes of a stream; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        if len(self.tail) > self.half:
            cut = len(self.tail) - self.half
            self.dropped += cut
            del self.tail[:cut]

    def text(self) -> str:
        if not self.dropped:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", errors="replace")
        return (bytes(self.head).decode("utf-8", errors="replace") + TRUNCATION_MARKER.format(dropped=self.dropped)
                + bytes(self.tail).decode("utf-8", errors="replace"))


async def _pump(stream: asyncio.StreamReader, capture: _Capture) -> None:
    while chunk := await stream.read(1 << 16):
        capture.feed(chunk)


class LocalSandbox:
    """One workspace; see the module docstring. Made by ``LocalSandboxProvider.create``."""

    def __init__(self, base: Path, uid: int | None, limits: SandboxLimits, mode: Mode, mounts: list[str],
                 python: str, cgroup: cgroups.SandboxCgroup | None = None,
                 registry: set[LocalSandbox] | None = None) -> None:
        self.base = base
        self.workspace = base / "work"
        self.uid = uid
        self.limits = limits
        self.mode = mode
        self.mounts = mounts
        self.python = python
        self.cgroup = cgroup
        self._registry = registry
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._closing = False
        self._closed = False

    # ---- commands ----

    def _argv(self, cmd: str) -> list[str]:
        lim = self.limits
        nproc = lim.max_processes
        if self.mode != "root":  # RLIMIT_NPROC counts every process of the user: leave room for them
            nproc += _user_process_count()
        rlimits = ["prlimit", f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 1}", f"--as={lim.memory_bytes}",
                   f"--nproc={nproc}", f"--fsize={lim.max_file_bytes}", f"--nofile={lim.max_open_files}",
                   "--core=0", "--", "/bin/bash", "-c", cmd]
        if self.mode == "none":
            return rlimits  # the cgroup is joined in _preexec
        ns = list(_NAMESPACES)
        if lim.network:
            ns.remove("--net")
        if self.mode == "userns":
            ns[1:1] = ["--user", "--map-root-user"]
        uid = str(self.uid) if self.mode == "root" else ""
        lo = "1" if lim.loopback and not lim.network else ""
        argv = ns + ["/bin/sh", "-c", _SETUP, "relayrl-sandbox", str(self.workspace), uid, lo, *self.mounts, "--",
                     *rlimits]
        if self.cgroup is not None:
            argv = ["/bin/sh", "-c", _JOIN, "relayrl-cgroup", *self.cgroup.join_dirs, "--", *argv]
        return argv

    def _env(self) -> dict[str, str]:
        return {
            "PATH": sandbox_path(self.python),
            "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHON": self.python, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
            **({"LOOPBACK_UP": _LOOPBACK_UP} if self.limits.loopback else {}),
        }

    async def exec(self, cmd: str, timeout: float | None = None) -> ExecResult:
        if self._closing:
            raise SandboxError("exec on a closed sandbox")
        limit = self.limits.timeout_s if timeout is None else min(check_timeout(timeout), self.limits.timeout_s)
        problem = command_problem(cmd)
        if problem is not None:  # the agent's mistake: an error it sees, like bash's own usage errors
            return ExecResult(exit_code=2, stdout="", stderr=f"relayrl sandbox: {problem}\n")
        async with self._lock:
            start = time.monotonic()
            cg = self.cgroup
            try:
                cpu_start, oom_start = (cg.cpu_seconds(), cg.oom_kills()) if cg is not None else (0.0, 0)
            except OSError as e:
                raise SandboxError(f"the sandbox's cgroup is gone or unreadable: {e}") from None
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(cmd), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=self._env(), cwd=str(self.workspace), start_new_session=True,
                    preexec_fn=self._preexec if self.mode == "none" and (self.uid is not None or cg is not None)
                    else None)
            except (OSError, ValueError) as e:
                raise SandboxError(f"could not start a command in the sandbox: {e}") from e
            self._proc = proc
            out, err = _Capture(self.limits.max_output_bytes), _Capture(self.limits.max_output_bytes)
            pumps = asyncio.gather(_pump(proc.stdout, out), _pump(proc.stderr, err))  # type: ignore[arg-type]
            over_cpu = asyncio.Event()
            watcher = asyncio.create_task(self._watch_cpu(proc, cpu_start, over_cpu)) if cg is not None else None
            timed_out = False
            try:
                await asyncio.wait_for(proc.wait(), limit)
            except asyncio.TimeoutError:
                timed_out = True
                self._kill(proc)
                await proc.wait()
            finally:
                self._proc = None
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
            if cg is not None:  # mode "none": what the command left running dies with it too
                await asyncio.to_thread(cg.kill_all)
            try:
                await asyncio.wait_for(pumps, 5.0)
            except asyncio.TimeoutError:  # a pipe held open by something that escaped (mode "none")
                pumps.cancel()
            notes = []
            if timed_out:
                # We killed it, so its status is SIGKILL whatever the reaper saw: asyncio's child
                # watcher reports 255 when it finds the child already reaped by another waitpid()
                # in this process (seen once in CI, in a suite that also runs Ray and DeepSpeed).
                code = -signal.SIGKILL
            elif over_cpu.is_set():
                code = 128 + signal.SIGXCPU
                notes.append(f"relayrl sandbox: CPU time limit exceeded: the command's processes together used "
                             f"more than {self.limits.cpu_seconds} CPU seconds and were killed")
            else:
                code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
                if code < 0:  # mode "none": report a signal as a shell does
                    code = 128 - code
            if cg is not None:
                try:
                    killed = cg.oom_kills() - oom_start
                except OSError:
                    killed = 0
                if killed > 0:
                    notes.append(f"relayrl sandbox: {killed} process(es) killed by the memory limit "
                                 f"({self.limits.memory_bytes >> 20} MiB for all the command's processes together)")
            stderr = err.text() + "".join(f"\n{n}\n" for n in notes)
            return ExecResult(exit_code=code, stdout=out.text(), stderr=stderr, timed_out=timed_out,
                              truncated=bool(out.dropped or err.dropped), duration_s=time.monotonic() - start)

    async def _watch_cpu(self, proc: asyncio.subprocess.Process, start: float, over: asyncio.Event) -> None:
        """Kill the command once its processes together used more than ``cpu_seconds``."""
        assert self.cgroup is not None
        while proc.returncode is None:
            await asyncio.sleep(CPU_POLL_S)
            try:
                used = self.cgroup.cpu_seconds() - start
            except OSError:
                return
            if used > self.limits.cpu_seconds:
                over.set()
                self._kill(proc)
                await asyncio.to_thread(self.cgroup.kill_all, 0.0)
                return

    def _preexec(self) -> None:  # pragma: no cover - runs in the child, mode "none"
        if self.cgroup is not None:
            for d in self.cgroup.join_dirs:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        # Killing unshare makes --kill-child SIGKILL the namespace's init, and the kernel then
        # kills everything in the PID namespace; the process group covers mode "none".
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except ProcessLookupError:
                pass

    # ---- files (host side, never following symlinks) ----

    def _parts(self, path: str) -> list[str]:
        if not isinstance(path, str) or not path or "\x00" in path:
            raise SandboxPathError(f"invalid path {path!r}")
        try:
            os.fsencode(path)
        except UnicodeEncodeError:
            raise SandboxPathError(f"invalid path {path!r}: not valid UTF-8 text") from None
        if os.path.isabs(path):
            raise SandboxPathError(f"{path}: give a path relative to the workspace root")
        parts = [p for p in Path(path).parts if p not in ("", ".")]
        if not parts or ".." in parts:
            raise SandboxPathError(f"{path}: the path must stay inside the workspace")
        return parts

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """A descriptor of the workspace subdirectory ``parts``, walked without symlinks."""
        fd = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        if self.uid is not None:
                            os.chown(part, self.uid, self.uid, dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        pass
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return fd
        except OSError:
            os.close(fd)
            raise

    async def write_file(self, path: str, data: bytes | str) -> None:
        parts = self._parts(path)
        payload = data.encode("utf-8", errors="replace") if isinstance(data, str) else bytes(data)
        if len(payload) > self.limits.max_file_bytes:
            raise SandboxPathError(f"{path}: {len(payload)} bytes is over the sandbox's file size limit "
                                   f"({self.limits.max_file_bytes})")
        try:
            dfd = self._open_dir(parts[:-1], create=True)
        except OSError as e:
            raise SandboxPathError(f"{path}: {_why(e)}") from None
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        except OSError as e:
            raise SandboxPathError(f"{path}: {_why(e)}") from None
        finally:
            os.close(dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxPathError(f"{path}: not a regular file")
            if self.uid is not None:
                os.fchown(fd, self.uid, self.uid)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(payload)
        finally:
            os.close(fd)

    async def read_file(self, path: str) -> bytes:
        parts = self._parts(path)
        try:
            dfd = self._open_dir(parts[:-1], create=False)
        except OSError as e:
            raise SandboxPathError(f"{path}: {_why(e)}") from None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as e:
            raise SandboxPathError(f"{path}: {_why(e)}") from None
        finally:
            os.close(dfd)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise SandboxPathError(f"{path}: {'is a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
        with os.fdopen(fd, "rb") as f:
            return f.read(self.limits.max_file_bytes + 1)[: self.limits.max_file_bytes]

    async def snapshot(self, max_total_bytes: int = 256 << 20) -> dict[str, bytes]:
        return await asyncio.to_thread(self._snapshot, max_total_bytes)

    def _snapshot(self, max_total_bytes: int) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        total = 0
        with contextlib.closing(regular_files(self.workspace)) as walk:
            for rel, dir_fd, name in walk:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError:
                    continue  # gone, or replaced by a link since it was listed
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    total += st.st_size
                    if total > max_total_bytes:
                        raise SandboxError(f"the workspace holds more than {max_total_bytes} bytes of files")
                    files[rel] = f.read(st.st_size + 1)
        return files

    async def close(self) -> None:
        """Kill the running command, delete the workspace, remove the cgroup. Marked closed only
        once all of that succeeded, so a failed close can be retried."""
        if self._closed:
            return
        self._closing = True
        if self._proc is not None and self._proc.returncode is None:
            self._kill(self._proc)
        await asyncio.to_thread(self._release)
        self._closed = True
        if self._registry is not None:
            self._registry.discard(self)

    def _release(self) -> None:
        remove_tree(self.base)
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except OSError as e:
                raise SandboxError(f"could not remove the sandbox's cgroup ({e}): a process in it did not "
                                   "die") from None


def sandbox_path(python: str) -> str:
    """The PATH of sandbox commands: the interpreter's directory first."""
    return f"{Path(python).parent}:/usr/local/bin:/usr/bin:/bin"


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "is a symlink (the sandbox does not follow links)"
    if e.errno == errno.ENOENT:
        return "no such file"
    if e.errno == errno.ENOTDIR:
        return "a parent is not a directory (or is a symlink)"
    if e.errno == errno.EISDIR:
        return "is a directory"
    return e.strerror or str(e)


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                n += entry.stat().st_uid == uid
            except OSError:
                pass
    return n


class LocalSandboxProvider:
    """Creates ``LocalSandbox``es under ``root`` (default: the system temp dir).

    Args:
        limits: per-command limits (``SandboxLimits``).
        root: where workspaces are created; put it on a size-limited filesystem to bound disk.
        hidden_paths: files and directories to cover with an empty mount inside the sandbox
            (your task files, so hidden tests cannot be read); /root, /home, relayrl's env
            package and the checkout's ``.git`` are always covered.
        mode: force ``root``, ``userns`` or ``none`` (default: the best this host allows).
        python: the interpreter that ``python`` runs inside (default: this one); its
            directories stay visible (read-only) wherever they are.
        cgroup: None (default): a cgroup per sandbox where the host allows one, else rlimits
            alone; False: rlimits alone; True: a cgroup or ValueError.

    ``network_isolated`` and ``cgroup_limits`` say which protections are in force.
    """

    _counter = itertools.count()

    def __init__(self, limits: SandboxLimits | None = None, root: str | None = None,
                 hidden_paths: list[str] | None = None, mode: Mode | None = None, python: str | None = None,
                 cgroup: bool | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.root = Path(root or Path(tempfile.gettempdir()) / "relayrl-sandboxes")
        self.mode: Mode = mode or probe_mode()
        self.network_isolated = self.mode != "none" and not self.limits.network
        self.python = os.path.abspath(python or sys.executable)
        self.cgroup_parents = cgroups.probe() if cgroup is not False else None
        if cgroup is True and self.cgroup_parents is None:
            raise ValueError("cgroup=True: this host has no cgroup relayrl can use (see the log for why)")
        self.cgroup_limits = self.cgroup_parents is not None
        for p in hidden_paths or []:
            if not isinstance(p, str) or not p or "\x00" in p:
                raise ValueError(f"hidden_paths: {p!r} is not a path")
        hidden = {"/root", "/home", str(ENVS_DIR), *checkout_git_paths()}
        for p in hidden_paths or []:  # as given and resolved: a link's own path shows the file too
            hidden |= {os.path.abspath(p), os.path.realpath(p)}
        self.hidden = sorted(hidden)
        covered = set(self.hidden) | set(PRIVATE_DIRS)
        interp = interpreter_dirs(self.python, sandbox_path(self.python))
        # Interpreter directories under a covered one are bound back (read-only); /run cannot be.
        keep = [d for d in interp if _is_under(d, covered, strictly=True) and not _is_under(d, ["/run"])]
        self.keep = sorted(d for d in keep if not _is_under(d, keep, strictly=True))
        first = [f"hide:{h}" for h in self.hidden if not _is_under(h, self.keep)]
        last = [f"hide:{h}" for h in self.hidden if _is_under(h, self.keep)]
        self.mounts = first + [f"keep:{k}" for k in self.keep] + last
        self._open: set[LocalSandbox] = set()

    async def create(self, files: dict[str, bytes | str] | None = None) -> LocalSandbox:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # traversable, not listable: workspaces are found only by name
        base = Path(tempfile.mkdtemp(prefix="sb-", dir=self.root))
        uid = None
        if self.mode == "root":
            uid = UID_BASE + (os.getpid() % 4096) * 4096 + next(self._counter) % 4096
        (base / "work").mkdir()
        if uid is not None:
            for p in (base, base / "work"):
                os.chown(p, uid, uid)
        os.chmod(base, 0o700)
        os.chmod(base / "work", 0o755)
        cg = None
        if self.cgroup_parents is not None:
            try:
                cg = cgroups.SandboxCgroup(self.cgroup_parents, self.limits.memory_bytes,
                                           self.limits.max_processes + SETUP_PROCESSES)
            except OSError as e:
                remove_tree(base)
                raise SandboxError(f"could not make the sandbox's cgroup: {e}") from None
        sandbox = LocalSandbox(base, uid, self.limits, self.mode, self.mounts, self.python, cg, self._open)
        try:
            for path, content in (files or {}).items():
                await sandbox.write_file(path, content)
        except BaseException:
            await sandbox.close()
            raise
        self._open.add(sandbox)
        return sandbox

    async def close(self) -> None:
        for sandbox in list(self._open):
            await sandbox.close()
        self._open.clear()
