"""Attacks on the local sandbox, one property per test (see the threat model in
``envs/local_sandbox.py``). Where it is safe to run, a companion test removes the protection
and shows the same attack succeeding, so a passing attack test means the protection works."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from relayrl.envs.local_sandbox import LocalSandboxProvider, probe_mode
from relayrl.envs.sandbox import SandboxLimits, SandboxPathError

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


def test_background_processes_escape_without_the_pid_namespace():
    provider = LocalSandboxProvider(SandboxLimits(timeout_s=20), mode="none")
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
