"""Local sandboxes: one workspace directory per episode, every command in fresh namespaces.

Threat model
------------
The policy under training writes and runs arbitrary code, and RL pushes it toward whatever
raises its reward, shortcuts included. On a host where relayrl runs as root (the usual case in
containers and on GPU nodes) each command runs like this::

    unshare --mount --net --pid --fork --kill-child --mount-proc   (new namespaces)
      private tmpfs on /tmp, /var/tmp, /dev/shm, /run; empty tmpfs over /root, /home and the
      ``hidden_paths`` (relayrl's shipped tasks, your task files): the interpreter's own
      directories are bound back read-only where they lived under a hidden one
      setpriv: a uid of its own (one per sandbox), no groups, no capabilities, no_new_privs
      prlimit: CPU seconds, address space, processes, file size, open files, no core files
      bash -c COMMAND, in the workspace

What it protects against, one property per attack test (``tests/test_sandbox_attacks.py``):

- network access: the network namespace has only a loopback interface, down (with
  ``SandboxLimits.loopback`` it is up, but the namespace is the command's own: 127.0.0.1 there
  reaches only the command's own processes, never the host's or another sandbox's);
- fork bombs: RLIMIT_NPROC on a uid no other process has;
- memory hogs: RLIMIT_AS;
- infinite loops: RLIMIT_CPU, and a wall-clock timeout that kills the PID namespace's init,
  which makes the kernel kill every process in it;
- processes left behind: the same PID namespace ends when the command ends, so ``&``,
  ``nohup``, ``setsid`` and double forks die with it; ``close()`` deletes the workspace;
- output floods: output is read in chunks and only a head and a tail are kept, with a visible
  marker; the rest is counted and dropped, so memory stays bounded;
- huge files: RLIMIT_FSIZE;
- writing outside the workspace: the uid owns nothing else; system directories are not
  writable to it, /tmp and friends are private tmpfs mounts thrown away after the command,
  other sandboxes' workspaces are mode 0700 under other uids;
- reading what it must not: root's and users' homes (keys, tokens, caches) and the task files
  (hidden tests) are covered by empty mounts; host paths given to ``read_file``/``write_file``
  are resolved without following symlinks, so a symlink the agent made cannot point them out.

What it does not protect against: kernel exploits (namespaces and rlimits are not a VM; use
remote sandboxes on separate hosts, or gVisor/VMs behind the ``Sandbox`` protocol, for hostile
code beyond RL policies); disk filling through many small files (no quota: put ``root`` on a
size-limited filesystem); CPU time spread over many processes up to the process limit; timing
and other side channels; reading world-readable host files outside the hidden paths (the
repository, site-packages) — hide what matters with ``hidden_paths``.

Without root, the same namespaces are made through a user namespace (``unshare --user
--map-root-user``): network, PID and mount isolation hold, but there is no separate uid, so
RLIMIT_NPROC counts all the user's processes and the workspace is writable only through the
user's own permissions. Without namespaces at all (some hardened hosts), commands still run in
their own process group under rlimits, but with network access and escapable by ``setsid``:
the provider says so loudly when it starts and ``network_isolated`` is False (the coding env
puts it in the metrics).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
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

from .sandbox import TRUNCATION_MARKER, ExecResult, SandboxError, SandboxLimits, SandboxPathError

log = logging.getLogger(__name__)

Mode = Literal["root", "userns", "none"]

UID_BASE = 1_500_000
"""Sandbox uids are drawn above every uid a distribution hands out, one per sandbox."""

SHIPPED_TASKS_DIR = Path(__file__).parent / "tasks"

# Runs as (namespace) root before the command: mounts, then drops to the sandbox uid and exec's
# the command under its rlimits. Arguments: workspace, uid ("" = keep), then pairs of
# "hide:PATH" / "keep:PATH", then "--", then the prlimit + bash argv.
_SETUP = r"""
set -e
ws="$1"; uid="$2"; lo="$3"; shift 3
stage=/run/.relayrl-stage
mount -t tmpfs -o mode=0755,size=1m tmpfs /run
mkdir -p "$stage"
mkdir "$stage/ws" && mount --bind "$ws" "$stage/ws"
hides=""; keeps=""; n=0
while [ "$1" != "--" ]; do
  case "$1" in
    hide:*) hides="$hides ${1#hide:}";;
    keep:*) p="${1#keep:}"; if [ -d "$p" ]; then n=$((n+1)); mkdir "$stage/k$n"; mount --bind "$p" "$stage/k$n"; keeps="$keeps $n:$p"; fi;;
  esac
  shift
done
shift
for d in /tmp /var/tmp /dev/shm; do [ -d "$d" ] && mount -t tmpfs -o mode=1777,size=256m tmpfs "$d"; done
for p in $hides; do [ -d "$p" ] && mount -t tmpfs -o mode=0755,size=1m tmpfs "$p"; done
for kp in $keeps; do k="${kp%%:*}"; p="${kp#*:}"; mkdir -p "$p"; mount --move "$stage/k$k" "$p"; mount -o remount,bind,ro "$p" || true; done
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

# Where ``ip`` is missing: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP, on ``lo``.
_LOOPBACK_UP = ("import fcntl, socket, struct\n"
                "s = socket.socket()\n"
                "req = fcntl.ioctl(s, 0x8913, struct.pack('16sH22s', b'lo', 0, b''))\n"
                "flags = struct.unpack('16sH22s', req)[1]\n"
                "fcntl.ioctl(s, 0x8914, struct.pack('16sH22s', b'lo', flags | 1, b''))\n")

_probe_cache: dict[str, Mode] = {}


def probe_mode() -> Mode:
    """Which isolation this host allows (checked once per process)."""
    if "mode" in _probe_cache:
        return _probe_cache["mode"]
    mode: Mode = "none"
    tools = all(shutil.which(t) for t in ("unshare", "prlimit", "mount"))
    ns = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if tools and os.geteuid() == 0 and shutil.which("setpriv") and _runs(ns + ["mount", "-t", "tmpfs", "tmpfs", "/tmp"]):
        mode = "root"
    elif tools and _runs(["unshare", "--user", "--map-root-user"] + ns[1:] + ["mount", "-t", "tmpfs", "tmpfs", "/tmp"]):
        mode = "userns"
    if mode == "none":
        log.warning("relayrl sandboxes: this host allows no network/PID/mount namespaces (unshare failed); "
                    "commands will run with network access and background processes can escape. "
                    "Use remote sandboxes on a host that allows them for real isolation.")
    _probe_cache["mode"] = mode
    return mode


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _interpreter_dirs() -> list[str]:
    """Directories the tests' interpreter needs: its prefix, base prefix and real executable's."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(os.path.realpath(sys.executable)).parent.parent)}
    return sorted(d for d in dirs if d)


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

    def __init__(self, base: Path, uid: int | None, limits: SandboxLimits, mode: Mode, hidden: list[str],
                 keep: list[str], python: str) -> None:
        self.base = base
        self.workspace = base / "work"
        self.uid = uid
        self.limits = limits
        self.mode = mode
        self.hidden = hidden
        self.keep = keep
        self.python = python
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
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
            return rlimits
        ns = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if not lim.network:
            ns.insert(1, "--net")
        if self.mode == "userns":
            ns[1:1] = ["--user", "--map-root-user"]
        uid = str(self.uid) if self.mode == "root" else ""
        paths = [f"hide:{p}" for p in self.hidden] + [f"keep:{p}" for p in self.keep]
        lo = "1" if lim.loopback and not lim.network else ""
        return ns + ["/bin/sh", "-c", _SETUP, "relayrl-sandbox", str(self.workspace), uid, lo, *paths, "--", *rlimits]

    def _env(self) -> dict[str, str]:
        bindir = str(Path(self.python).parent)
        return {
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHON": self.python, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
            **({"LOOPBACK_UP": _LOOPBACK_UP} if self.limits.loopback else {}),
        }

    async def exec(self, cmd: str, timeout: float | None = None) -> ExecResult:
        if self._closed:
            raise SandboxError("exec on a closed sandbox")
        limit = self.limits.timeout_s if timeout is None else min(timeout, self.limits.timeout_s)
        async with self._lock:
            start = time.monotonic()
            cwd = str(self.workspace)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(cmd), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=self._env(), cwd=cwd, start_new_session=True,
                    preexec_fn=self._drop_privileges if self.mode == "none" and self.uid is not None else None)
            except OSError as e:
                raise SandboxError(f"could not start a command in the sandbox: {e}") from e
            self._proc = proc
            out, err = _Capture(self.limits.max_output_bytes), _Capture(self.limits.max_output_bytes)
            pumps = asyncio.gather(_pump(proc.stdout, out), _pump(proc.stderr, err))  # type: ignore[arg-type]
            timed_out = False
            try:
                await asyncio.wait_for(proc.wait(), limit)
            except asyncio.TimeoutError:
                timed_out = True
                self._kill(proc)
                await proc.wait()
            finally:
                self._proc = None
            try:
                await asyncio.wait_for(pumps, 5.0)
            except asyncio.TimeoutError:  # a pipe held open by something that escaped (mode "none")
                pumps.cancel()
            if timed_out:
                # We killed it, so its status is SIGKILL whatever the reaper saw: asyncio's child
                # watcher reports 255 when it finds the child already reaped by another waitpid()
                # in this process (seen once in CI, in a suite that also runs Ray and DeepSpeed).
                code = -signal.SIGKILL
            else:
                code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
                if code < 0:  # mode "none": report a signal as a shell does
                    code = 128 - code
            return ExecResult(exit_code=code, stdout=out.text(), stderr=err.text(), timed_out=timed_out,
                              truncated=bool(out.dropped or err.dropped), duration_s=time.monotonic() - start)

    def _drop_privileges(self) -> None:  # pragma: no cover - runs in the child, mode "none" as root
        assert self.uid is not None
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
        files: dict[str, bytes] = {}
        total = 0
        for dirpath, dirnames, filenames in os.walk(self.workspace, followlinks=False):
            rel_dir = Path(dirpath).relative_to(self.workspace)
            for name in sorted(filenames):
                full = Path(dirpath) / name
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinks, fifos, sockets: not part of a workspace snapshot
                total += st.st_size
                if total > max_total_bytes:
                    raise SandboxError(f"the workspace holds more than {max_total_bytes} bytes of files")
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as f:
                    files[str(rel_dir / name) if str(rel_dir) != "." else name] = f.read()
        return files

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc is not None and self._proc.returncode is None:
            self._kill(self._proc)
        await asyncio.to_thread(_remove_tree, self.base)


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


def _remove_tree(path: Path) -> None:
    def fix(func, p, _exc):  # a command may leave directories without write/exec permission
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except OSError:
            pass

    if path.exists():
        shutil.rmtree(path, onerror=fix)


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
        hidden_paths: extra directories to cover with an empty mount inside the sandbox (your
            task files, so hidden tests cannot be read); relayrl's shipped tasks, /root and
            /home are always covered.
        mode: force ``root``, ``userns`` or ``none`` (default: the best this host allows).
    """

    _counter = itertools.count()

    def __init__(self, limits: SandboxLimits | None = None, root: str | None = None,
                 hidden_paths: list[str] | None = None, mode: Mode | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.root = Path(root or Path(tempfile.gettempdir()) / "relayrl-sandboxes")
        self.mode: Mode = mode or probe_mode()
        self.network_isolated = self.mode != "none" and not self.limits.network
        self.python = sys.executable
        interp = _interpreter_dirs()
        self.hidden = sorted({"/root", "/home", str(SHIPPED_TASKS_DIR.resolve()),
                              *(str(Path(p).resolve()) for p in hidden_paths or [])})
        # Interpreter directories under a hidden one are bound back (read-only).
        self.keep = sorted(d for d in interp if any(d == h or d.startswith(h + "/") for h in self.hidden))
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
        sandbox = LocalSandbox(base, uid, self.limits, self.mode, self.hidden, self.keep, self.python)
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
