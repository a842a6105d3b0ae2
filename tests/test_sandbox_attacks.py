"""Attacks on the local sandbox, one property per test (see the threat model in
``envs/local_sandbox.py``). Where it is safe to run, a companion test removes the protection
and shows the same attack succeeding, so a passing attack test means the protection works."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from relayrl.config import ConfigError
from relayrl.envs.check import run_check
from relayrl.envs.coding import CodingEnv
from relayrl.envs.local_sandbox import ENVS_DIR, LocalSandboxProvider, probe_mode
from relayrl.envs.sandbox import SandboxLimits, SandboxPathError
from relayrl.types import ToolCall

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(probe_mode() != "root", reason="the full sandbox needs root (CI runs as root)")


def run(cmd: str, files=None, provider=None, **limits):
    async def go():
        p = provider or LocalSandboxProvider(SandboxLimits(**{"timeout_s": 20, **limits}))
        sb = await p.create(files)
        try:
            return await sb.exec(cmd)
        finally:
            await sb.close()

    return asyncio.run(go())


def processes_matching(text: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if text in Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_fork_bomb_is_stopped_by_the_process_limit():
    r = run(":(){ :|:& };:; sleep 1; echo survived", max_processes=32, timeout_s=10)
    assert "Resource temporarily unavailable" in r.stderr
    # The bomb's processes died with its PID namespace; the machine still forks.
    assert processes_matching(":|:") == []
    assert run("echo ok").stdout == "ok\n"


def test_memory_hog_gets_memory_error():
    r = run("python -c 'x = bytearray(1 << 30); print(len(x))'", memory_bytes=512 << 20)
    assert r.exit_code == 1 and "MemoryError" in r.stderr


def test_memory_hog_without_the_limit_succeeds():
    r = run("python -c 'x = bytearray(1 << 30); print(len(x))'", memory_bytes=4 << 30)
    assert r.exit_code == 0 and r.stdout == f"{1 << 30}\n"


def test_infinite_loop_is_killed_by_the_cpu_limit():
    r = run("while :; do :; done", cpu_seconds=1, timeout_s=30)
    assert r.exit_code == 128 + 24 and not r.timed_out  # SIGXCPU
    assert "CPU time limit exceeded" in r.stderr


def test_sleeping_loop_is_killed_by_the_wall_clock():
    r = run("while :; do sleep 1; done", timeout_s=1.5)
    assert r.timed_out and r.exit_code == -9
    assert processes_matching("while :; do sleep 1; done") == []


def test_output_flood_is_truncated_with_a_marker():
    r = run("yes relayrl | head -c 200000000; echo end >&2", max_output_bytes=4096)
    assert r.exit_code == 0 and r.truncated
    assert "[... output truncated: 199995904 bytes dropped ...]" in r.stdout
    assert r.stdout.startswith("relayrl\n") and len(r.stdout) < 4096 + 100
    assert r.stderr == "end\n"


class _Listener:
    """A TCP server on the host's loopback that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
            self.connected.set()
            conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


CONNECT = "python -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=3); print(\"connected\")'"


def test_network_is_unreachable():
    server = _Listener()
    try:
        r = run(CONNECT.format(port=server.port) + "; python -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=3)'")
        assert "connected" not in r.stdout and not server.connected.is_set()
        assert "Connection refused" in r.stderr or "Network is unreachable" in r.stderr
        assert "Network is unreachable" in r.stderr
    finally:
        server.close()


def test_network_without_the_namespace_reaches_the_host():
    server = _Listener()
    try:
        r = run(CONNECT.format(port=server.port), network=True)
        assert r.stdout == "connected\n" and server.connected.wait(5)
    finally:
        server.close()


@pytest.fixture(params=["tmp", "var"])
def sandbox_root(request):
    """Workspaces under /tmp (hidden inside by the private /tmp) or under a path every sandbox
    sees (where the other workspace is guarded by its uid and mode 0700)."""
    if request.param == "tmp":
        yield None, "No such file or directory"
        return
    root = Path(f"/var/lib/relayrl-attack-{os.getpid()}")
    yield str(root), "Permission denied"
    shutil.rmtree(root, ignore_errors=True)


def test_writes_outside_the_workspace_fail_or_stay_private(sandbox_root):
    root, other_error = sandbox_root
    repo = Path(__file__).resolve().parents[1]
    tag = f"relayrl-attack-{os.getpid()}"
    targets = [f"/etc/{tag}", f"{repo}/{tag}", f"/root/{tag}", f"/usr/{tag}", f"/var/{tag}"]

    async def go():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=20), root=root)
        other = await p.create({"secret.txt": "other sandbox"})
        me = await p.create()
        try:
            cmd = "; ".join(f"touch {t} 2>/dev/null && echo wrote {t}" for t in targets)
            cmd += f"; cat {other.workspace}/secret.txt 2>&1; touch {other.workspace}/x 2>&1"
            cmd += f"; touch /tmp/{tag} /dev/shm/{tag} /var/tmp/{tag} && echo private-tmp-ok"
            return await me.exec(cmd), await other.snapshot()
        finally:
            await me.close()
            await other.close()

    r, other_files = asyncio.run(go())
    assert "wrote" not in r.stdout, r.stdout
    assert r.stdout.count(other_error) == 2, r.stdout  # the other sandbox's workspace: no read, no write
    assert other_files == {"secret.txt": b"other sandbox"}
    assert "private-tmp-ok" in r.stdout  # /tmp is writable inside ...
    for t in targets + [f"/tmp/{tag}", f"/dev/shm/{tag}", f"/var/tmp/{tag}"]:
        assert not os.path.exists(t), t  # ... but nothing reached the host


def test_home_and_task_files_are_hidden():
    secret = Path("/root") / f"relayrl-secret-{os.getpid()}"
    secret.write_text("token")
    try:
        r = run(f"cat {secret} 2>&1; ls -A /root | wc -l")
        assert "token" not in r.stdout and "No such file" in r.stdout
    finally:
        secret.unlink()


def test_background_processes_die_with_the_command():
    r = run("setsid sleep 1001 & nohup sleep 1002 >/dev/null 2>&1 & (sleep 1003 &) ; echo started")
    assert r.stdout == "started\n"
    assert processes_matching("sleep 100") == []


def test_background_processes_escape_without_the_pid_namespace_or_a_cgroup():
    provider = LocalSandboxProvider(SandboxLimits(timeout_s=20), mode="none", cgroup=False)
    r = run("setsid sleep 1004 >/dev/null 2>&1 < /dev/null & echo started", provider=provider)
    try:
        assert r.stdout == "started\n"
        assert processes_matching("sleep 1004") != []
    finally:
        for pid in processes_matching("sleep 1004"):
            os.kill(pid, 9)


def test_huge_file_is_cut_at_the_file_size_limit():
    r = run("dd if=/dev/zero of=big bs=1M count=20 2>&1; stat -c %s big", max_file_bytes=1 << 20)
    assert "File size limit exceeded" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(1 << 20)


def test_huge_file_without_the_limit_is_written():
    r = run("dd if=/dev/zero of=big bs=1M count=20 2>/dev/null; stat -c %s big", max_file_bytes=64 << 20)
    assert r.stdout == f"{20 << 20}\n"


def test_symlinks_do_not_lead_host_side_file_access_out():
    async def go():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=20))
        sb = await p.create()
        try:
            await sb.exec("ln -s /etc/passwd p; ln -s /etc d; mkdir -p a; ln -s ../../../../../../etc a/up")
            errors = []
            for op in (lambda: sb.read_file("p"), lambda: sb.write_file("d/x", "x"), lambda: sb.read_file("a/up/passwd"),
                       lambda: sb.write_file("p", "pwned")):
                try:
                    await op()
                    errors.append(None)
                except SandboxPathError as e:
                    errors.append(str(e))
            return errors, await sb.snapshot()
        finally:
            await sb.close()

    errors, snap = asyncio.run(go())
    assert all(e is not None for e in errors), errors
    assert snap == {}  # symlinks are not files of the snapshot
    assert "pwned" not in Path("/etc/passwd").read_text()



# ---- the interpreter, wherever it lives ----


@pytest.fixture
def venv_under_tmp():
    """A real virtualenv under /tmp, which every command sees as an empty private tmpfs (a fresh
    clone in /tmp running scripts/quickstart.sh has its .venv there)."""
    venv = Path(tempfile.mkdtemp(prefix="relayrl-venv-", dir="/tmp"))
    venv.chmod(0o755)  # as a clone's directories are: the sandbox's own uid must reach the interpreter
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, capture_output=True, timeout=120)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.parametrize("through_link", [False, True], ids=["venv", "venv-through-a-symlink"])
def test_a_virtualenv_under_tmp_runs_inside(venv_under_tmp, through_link):
    root = venv_under_tmp
    if through_link:
        root = Path(f"/tmp/relayrl-venv-link-{os.getpid()}")
        root.symlink_to(venv_under_tmp)
    try:
        provider = LocalSandboxProvider(SandboxLimits(timeout_s=20), python=str(root / "bin" / "python"))
        r = run("command -v python; python -c 'import sys; print(sys.prefix)'", provider=provider)
    finally:
        if through_link:
            root.unlink()
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{root}/bin/python"
    assert r.stdout.splitlines()[1] in (str(root), str(venv_under_tmp))


def test_envs_check_stops_at_the_preflight_naming_the_cause():
    # The interpreter's own trees hidden: ``python`` cannot run inside, and the check says why
    # before it scores a reference solution 0.0 with no reason.
    with pytest.raises(ConfigError) as e:
        run_check("coding", {"sandbox": {"hidden_paths": [sys.prefix, sys.base_prefix]}}, None, limit=1)
    message = str(e.value)
    assert "failed its preflight check" in message and "cannot run pytest" in message
    assert "not found inside the sandbox" in message and sys.executable in message


# ---- IPC ----

IPC = r"""
import ctypes, ctypes.util, json, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
rt = ctypes.CDLL(ctypes.util.find_library("rt") or ctypes.util.find_library("c"), use_errno=True)
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
IPC_CREAT, IPC_RMID, O_CREAT, O_RDWR = 0o1000, 0, 0o100, 2

def look(key, name):
    q = rt.mq_open(name.encode(), O_RDWR, 0, None)
    if q >= 0:
        rt.mq_close(q)
    return {"shm": libc.shmget(key, 0, 0) >= 0, "sem": libc.semget(key, 0, 0) >= 0,
            "msg": libc.msgget(key, 0) >= 0, "mq": q >= 0}

def make(key, name):
    q = rt.mq_open(name.encode(), O_CREAT | O_RDWR, 0o666, None)
    if q >= 0:
        rt.mq_close(q)
    return {"shm": libc.shmget(key, 4096, IPC_CREAT | 0o666) >= 0, "sem": libc.semget(key, 1, IPC_CREAT | 0o666) >= 0,
            "msg": libc.msgget(key, IPC_CREAT | 0o666) >= 0, "mq": q >= 0}

def remove(key, name):
    for get, ctl in ((lambda: libc.shmget(key, 0, 0), lambda i: libc.shmctl(i, IPC_RMID, None)),
                     (lambda: libc.semget(key, 0, 0), lambda i: libc.semctl(i, 0, IPC_RMID)),
                     (lambda: libc.msgget(key, 0), lambda i: libc.msgctl(i, IPC_RMID, None))):
        i = get()
        if i >= 0:
            ctl(i)
    rt.mq_unlink(name.encode())

if __name__ == "__main__":
    what, key, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps({"look": look, "make": make}[what](key, name)))
"""


def test_ipc_objects_do_not_cross_the_command_boundary():
    import json

    ipc: dict = {}
    exec(IPC, ipc)  # the same helpers, on the host
    host_key, box_key = 0x52520000 + os.getpid() % 0x8000, 0x52528000 + os.getpid() % 0x8000
    host_name, box_name = f"/relayrl-host-{os.getpid()}", f"/relayrl-box-{os.getpid()}"
    none = {"shm": False, "sem": False, "msg": False, "mq": False}
    assert ipc["make"](host_key, host_name) == {k: True for k in none}  # world-readable: only the namespace hides it

    async def go():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=20))
        a, b = await p.create({"ipc.py": IPC}), await p.create({"ipc.py": IPC})
        try:
            sees_host = await a.exec(f"python ipc.py look {host_key} {host_name}")
            made = await a.exec(f"python ipc.py make {box_key} {box_name}")
            later = await a.exec(f"python ipc.py look {box_key} {box_name}")
            other = await b.exec(f"python ipc.py look {box_key} {box_name}")
            return [json.loads(r.stdout) for r in (sees_host, made, later, other)]
        finally:
            await p.close()

    try:
        sees_host, made, later, other = asyncio.run(go())
        on_host = ipc["look"](box_key, box_name)
    finally:
        ipc["remove"](host_key, host_name)
        ipc["remove"](box_key, box_name)
    assert sees_host == none  # the host's segment, semaphore and queues are not there
    assert made == {k: True for k in none}  # the command may use IPC ...
    assert later == none and other == none and on_host == none  # ... and it dies with the command


# ---- unix sockets ----


class _UnixListener:
    """A world-writable unix socket the host listens on (an X server's, a container runtime's)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)  # so that only the mount, not the socket's mode, keeps the sandbox out
        self.sock.listen()
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
            self.connected.set()
            conn.close()
        except OSError:
            pass


UNIX_CONNECT = ("python -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(3); "
                "a = sys.argv[1]; s.connect(chr(0) + a[1:] if a[0] == \"@\" else a); print(\"connected\")' {address}")


@pytest.fixture
def socket_dir(request):
    """A directory of the host holding a listening socket: one of the usual places, or one the
    threat model says is not covered."""
    where = request.param
    made = []
    if where == "abstract":
        yield "abstract", f"@relayrl-attack-{os.getpid()}"
        return
    d = Path({"run": "/run", "x11": "/tmp/.X11-unix", "var-lib": f"/var/lib/relayrl-attack-sock-{os.getpid()}"}[where])
    if not d.exists():
        d.mkdir(mode=0o1777)
        made.append(d)
    os.chmod(d, os.stat(d).st_mode | 0o711) if made else None
    address = str(d / f"relayrl-attack-{os.getpid()}.sock")
    yield where, address
    Path(address).unlink(missing_ok=True)
    for m in made:
        shutil.rmtree(m, ignore_errors=True)


@pytest.mark.parametrize("socket_dir", ["run", "x11", "abstract"], indirect=True)
def test_host_unix_sockets_are_unreachable(socket_dir):
    where, address = socket_dir
    listener = _UnixListener("\0" + address[1:] if where == "abstract" else address)
    try:
        r = run(UNIX_CONNECT.format(address=address))
    finally:
        listener.sock.close()
    assert "connected" not in r.stdout and not listener.connected.is_set()
    assert ("No such file or directory" if where != "abstract" else "Connection refused") in r.stderr


@pytest.mark.parametrize("socket_dir", ["var-lib"], indirect=True)
def test_a_host_socket_outside_the_usual_directories_is_reachable(socket_dir):
    # What the threat model says is not covered: hide such a directory with hidden_paths.
    _, address = socket_dir
    listener = _UnixListener(address)
    try:
        r = run(UNIX_CONNECT.format(address=address))
        hiding = LocalSandboxProvider(SandboxLimits(timeout_s=20), hidden_paths=[str(Path(address).parent)])
        hidden = run(UNIX_CONNECT.format(address=address), provider=hiding)
    finally:
        listener.sock.close()
    assert r.stdout == "connected\n" and listener.connected.is_set()
    assert "connected" not in hidden.stdout


# ---- limits over all of a command's processes (the sandbox's cgroup) ----

HAS_CGROUP = LocalSandboxProvider().cgroup_limits
FOUR_HOGS = ("for i in 1 2 3 4; do python -c 'import time; b = b\"x\" * (60 << 20); time.sleep(3)' & done; "
             "f=0; for i in 1 2 3 4; do wait -n || f=$((f+1)); done; echo killed=$f; exit $f")


def test_the_cgroup_metric_says_which_limits_hold():
    async def go():
        env = CodingEnv(sandbox={"timeout_s": 20})
        try:
            await env.reset({"id": "t", "instruction": "x", "files": [{"path": "a.py", "content": ""}],
                             "hidden_tests": [{"path": "test_a.py", "content": "def test_a():\n    pass\n"}]})
            return (await env.score()).details["cgroup_limits"]
        finally:
            await env.close()

    assert asyncio.run(go()) == float(HAS_CGROUP)
    if not HAS_CGROUP:
        pytest.skip("this host has no usable cgroup (see the log): limits hold per process, as the metric says")


@pytest.mark.skipif(not HAS_CGROUP, reason="this host has no usable cgroup: memory is limited per process only")
def test_memory_spread_over_processes_is_bounded():
    provider = LocalSandboxProvider(SandboxLimits(timeout_s=30, memory_bytes=128 << 20))
    r = run(FOUR_HOGS, provider=provider)
    assert r.exit_code != 0 and "killed=0" not in r.stdout, r
    assert "killed by the memory limit (128 MiB for all the command's processes together)" in r.stderr
    parents = provider.cgroup_parents.dirs.values()
    assert [c for d in parents for c in d.glob(f"relayrl-{os.getpid()}-*")] == []  # removed on close


def test_memory_spread_over_processes_without_a_cgroup_passes_the_limit():
    provider = LocalSandboxProvider(SandboxLimits(timeout_s=30, memory_bytes=128 << 20), cgroup=False)
    r = run(FOUR_HOGS, provider=provider)
    assert r.exit_code == 0 and r.stdout == "killed=0\n", r  # 4 x 60 MiB held at once


@pytest.mark.skipif(not HAS_CGROUP, reason="this host has no usable cgroup: CPU time is limited per process only")
def test_cpu_time_spread_over_processes_is_bounded():
    # Four busy loops, one CPU second in all: RLIMIT_CPU alone would give each its own second.
    r = run("for i in 1 2 3 4; do (while :; do :; done) & done; wait; echo survived", cpu_seconds=1, timeout_s=30)
    assert r.exit_code == 128 + 24 and not r.timed_out, r  # as SIGXCPU reports a single process
    assert "survived" not in r.stdout
    assert "together used more than 1 CPU seconds" in r.stderr
    assert processes_matching("while :; do :; done") == []


# ---- what the sandbox hides ----


def test_task_files_env_code_and_the_checkout_git_are_hidden():
    d = Path(f"/var/lib/relayrl-attack-tasks-{os.getpid()}")  # outside /root, /home and /tmp
    d.mkdir(mode=0o755)
    task = d / "tasks.jsonl"
    task.write_text('{"hidden_tests": "SECRET-HIDDEN-TEST"}\n')
    task.chmod(0o644)
    git = REPO / ".git"
    try:
        async def go():
            env = CodingEnv(sandbox={"timeout_s": 20}, hidden_paths=[str(task)])
            try:
                await env.reset({"id": "t", "instruction": "x", "files": [{"path": "a.py", "content": ""}],
                                 "hidden_tests": [{"path": "test_a.py", "content": "def test_a():\n    pass\n"}]})
                cmd = (f"cat {task}; cat {ENVS_DIR}/taskgen.py {ENVS_DIR}/tasks/python_tasks.jsonl 2>&1 | head -c 300; "
                       f"echo; ls -A {git} 2>&1 | wc -l")
                return (await env.step(ToolCall("bash", {"command": cmd}))).observation
            finally:
                await env.close()

        seen = asyncio.run(go())
        unhidden = run(f"cat {task}")
    finally:
        shutil.rmtree(d)
    assert "SECRET" not in seen and "def " not in seen and "hidden_tests" not in seen, seen
    assert "No such file or directory" in seen  # the env's code and shipped tasks
    if git.is_dir():
        assert seen.rstrip().splitlines()[-1] == "0"  # an empty .git
    assert "SECRET-HIDDEN-TEST" in unhidden.stdout  # not in hidden_paths: readable, so the mount is what hides it


@pytest.mark.skipif(not HAS_CGROUP, reason="this host has no usable cgroup")
def test_without_namespaces_the_cgroup_still_ends_what_a_command_left_running():
    provider = LocalSandboxProvider(SandboxLimits(timeout_s=20), mode="none")
    r = run("setsid sleep 1005 >/dev/null 2>&1 < /dev/null & echo started", provider=provider)
    assert r.stdout == "started\n"
    assert processes_matching("sleep 1005") == []
