"""The sandbox server and its client on loopback: the contract, auth, many sandboxes at once,
limits, idle reaping, and a dead server that fails fast and clearly instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayrl.envs.check import run_check
from relayrl.envs.contract import check_sandbox_provider
from relayrl.envs.remote_sandbox import RemoteSandboxProvider, SandboxServer
from relayrl.envs.sandbox import SandboxError, SandboxLimits, SandboxPathError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"


def go(coro):
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(port: int, *args: str) -> subprocess.Popen:
    """``relayrl sandbox-server`` in a subprocess, returned once its banner says it listens."""
    env = {**os.environ, "RELAYRL_SANDBOX_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "relayrl", "sandbox-server", "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = proc.stdout.readline()
    assert f"relayrl sandbox server on http://127.0.0.1:{port}" in banner and "token auth" in banner, banner
    return proc


def kill_commands_under(root: Path) -> None:
    """SIGKILL the sandbox commands whose workspace is under ``root`` (their ``unshare``; its
    --kill-child takes the namespace down). A SIGKILLed server cannot kill them itself."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"unshare") and any(str(root).encode() in a for a in argv):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

def remove_cgroups_of(pid: int) -> None:
    """Remove the (empty) sandbox cgroups a SIGKILLed server left behind, as its operator would."""
    from relayrl.envs import cgroups

    parents = cgroups.probe()
    for d in parents.dirs.values() if parents is not None else []:
        for child in d.glob(f"relayrl-{pid}-*"):
            for _ in range(100):  # its commands were just killed: they leave the cgroup a moment later
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def test_contract_through_the_client():
    async def main():
        async with SandboxServer(token=TOKEN, limits=SandboxLimits(timeout_s=10)) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                return await check_sandbox_provider(client)
            finally:
                await client.close()

    results = go(main())
    assert {r.name: r.detail for r in results if not r.ok} == {}


def test_round_trip_and_path_errors():
    async def main():
        async with SandboxServer(token=TOKEN) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create({"a.txt": "A", "b/c.bin": b"\xff\x00"})
                r = await sb.exec("cat a.txt b/c.bin | wc -c; printf '\\xff' >&2; exit 5")
                await sb.write_file("new.txt", "né")
                read = await sb.read_file("new.txt")
                snap = await sb.snapshot()
                with pytest.raises(SandboxPathError, match="inside the workspace"):
                    await sb.read_file("../etc/passwd")
                with pytest.raises(SandboxPathError, match="no such file"):
                    await sb.read_file("missing")
                await sb.close()
                await sb.close()
                return r, read, snap, client.network_isolated, client.server_timeout_s
            finally:
                await client.close()

    r, read, snap, isolated, server_timeout = go(main())
    assert r.exit_code == 5 and r.stdout == "3\n" and r.stderr == "\ufffd"
    assert read == "né".encode()
    assert snap == {"a.txt": b"A", "b/c.bin": b"\xff\x00", "new.txt": "né".encode()}
    assert isolated is True and server_timeout == SandboxLimits().timeout_s


def test_token_is_required_and_checked():
    async def main():
        async with SandboxServer(token=TOKEN) as server:
            errors = []
            for token in (None, "wrong"):
                client = RemoteSandboxProvider(server.url, token=token)
                try:
                    await client.create()
                except SandboxError as e:
                    errors.append(str(e))
                finally:
                    await client.close()
            return errors

    env_token = os.environ.pop("RELAYRL_SANDBOX_TOKEN", None)
    try:
        errors = go(main())
    finally:
        if env_token is not None:
            os.environ["RELAYRL_SANDBOX_TOKEN"] = env_token
    assert len(errors) == 2 and all("rejected the token" in e for e in errors)


def test_32_concurrent_sandboxes():
    async def one(client, i):
        sb = await client.create({"i": str(i)})
        try:
            outs = [(await sb.exec("cat i")).stdout for _ in range(3)]
            return outs
        finally:
            await sb.close()

    async def main():
        async with SandboxServer(token=TOKEN, max_sandboxes=32) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                outs = await asyncio.gather(*(one(client, i) for i in range(32)))
                return outs, (await client.health())["sandboxes"]
            finally:
                await client.close()

    outs, left = go(main())
    assert outs == [[str(i)] * 3 for i in range(32)]
    assert left == 0


def test_max_sandboxes_is_enforced():
    async def main():
        async with SandboxServer(token=TOKEN, max_sandboxes=2) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                await client.create()
                await client.create()
                with pytest.raises(SandboxError, match="maximum of 2 sandboxes"):
                    await client.create()
            finally:
                await client.close()

    go(main())


def test_idle_sandboxes_are_reaped():
    async def main():
        async with SandboxServer(token=TOKEN, idle_ttl_s=0.3) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                await asyncio.sleep(1.0)
                assert (await client.health())["sandboxes"] == 0
                with pytest.raises(SandboxError, match="no such sandbox"):
                    await sb.exec("true")
            finally:
                await client.close()

    go(main())


def test_nobody_listening_fails_fast_and_clearly():
    async def main():
        client = RemoteSandboxProvider(f"http://127.0.0.1:{free_port()}", token=TOKEN, connect_timeout_s=2)
        t0 = time.monotonic()
        try:
            with pytest.raises(SandboxError) as e:
                await client.create()
            return str(e.value), time.monotonic() - t0
        finally:
            await client.close()

    message, _ = go(main())
    assert "is unreachable" in message and "relayrl sandbox-server" in message


def test_server_killed_mid_command_is_a_sandbox_error(tmp_path):
    port = free_port()
    proc = start_cli_server(port, "--timeout", "60", "--root", str(tmp_path))  # SIGKILL leaves its workspace
    try:
        async def main():
            client = RemoteSandboxProvider(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=5)
            try:
                sb = await client.create()
                task = asyncio.create_task(sb.exec("sleep 20", timeout=25))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                with pytest.raises(SandboxError) as e:
                    await task
                return str(e.value)
            finally:
                await client.close()

        message = go(main())
        assert f"sandbox server http://127.0.0.1:{port}" in message and "dropped the connection" in message
    finally:
        proc.kill()
        proc.wait()
        kill_commands_under(tmp_path)
        remove_cgroups_of(proc.pid)



@pytest.mark.parametrize("args, message", [
    ([], "needs a token"),
    (["--no-auth", "--host", "0.0.0.0"], "--no-auth: only allowed on a loopback --host"),
])
def test_cli_refuses_to_serve_without_a_token(args, message):
    env = {k: v for k, v in os.environ.items() if k != "RELAYRL_SANDBOX_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "relayrl", "sandbox-server", "--port", "0", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_coding_env_contract_through_a_remote_sandbox():
    async def start():
        server = SandboxServer(token=TOKEN, limits=SandboxLimits(timeout_s=20))
        await server.start()
        return server

    # The server runs on its own loop in a thread; run_check drives the client from another.
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        results, n = run_check("coding", {"sandbox": {"kind": "remote", "url": server.url, "token": TOKEN}}, None, limit=2)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert n == 2 and {r.name: r.detail for r in results if not r.ok} == {}
    assert "sandbox: network isolation" in {r.name for r in results}


def test_concurrent_creates_cannot_pass_max_sandboxes():
    # Six creates race for two slots: a check-then-create without a reservation would let all in.
    async def main():
        async with SandboxServer(token=TOKEN, max_sandboxes=2) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                await client.health()
                results = await asyncio.gather(*(client.create({"f": "x" * 1000}) for _ in range(6)),
                                               return_exceptions=True)
                return results, (await client.health())["sandboxes"]
            finally:
                await client.close()

    results, held = go(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 4 and held == 2
    assert all(isinstance(e, SandboxError) and "maximum of 2 sandboxes" in str(e) for e in errors)


def test_stop_closes_every_sandbox_even_mid_command(tmp_path):
    async def main():
        client = None
        async with SandboxServer(token=TOKEN, root=str(tmp_path)) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            sandboxes = [await client.create({"a": "1"}) for _ in range(3)]
            running = asyncio.create_task(sandboxes[0].exec("sleep 30", timeout=30))
            await asyncio.sleep(0.5)
            assert len(list(tmp_path.glob("sb-*"))) == 3
        try:  # the server stopped: the command was killed, not waited for
            result = await asyncio.wait_for(running, 20)
        except SandboxError as e:
            result = e
        await client.close()
        return result

    result = go(main())
    assert isinstance(result, SandboxError) or (result.exit_code != 0 and not result.ok), result
    assert list(tmp_path.glob("sb-*")) == []


def test_sigterm_closes_every_sandbox(tmp_path):
    port = free_port()
    proc = start_cli_server(port, "--root", str(tmp_path))
    try:
        async def main():
            client = RemoteSandboxProvider(f"http://127.0.0.1:{port}", token=TOKEN)
            try:
                sandboxes = [await client.create({"a": "1"}) for _ in range(2)]
                await sandboxes[0].exec("true")
                assert len(list(tmp_path.glob("sb-*"))) == 2
            finally:
                client._open.clear()  # leave them open: the server must close them itself
                await client.close()

        go(main())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "every sandbox closed" in out and "Traceback" not in out, out
    assert list(tmp_path.glob("sb-*")) == []


def test_a_server_that_never_answers_times_out():
    # Accepts connections (the kernel's backlog) and never answers: a hung host, not a dead one.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        async def main():
            client = RemoteSandboxProvider(url, token=TOKEN, timeout_s=1.0, connect_timeout_s=1.0)
            try:
                with pytest.raises(SandboxError) as e:
                    await client.create()
                return str(e.value)
            finally:
                await client.close()

        message = go(main())
    assert f"sandbox server {url} did not answer GET /health within 1s" in message


def test_body_over_the_limit_is_refused():
    async def main():
        async with SandboxServer(token=TOKEN, max_body_bytes=4096) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                await sb.write_file("small", b"x" * 1000)
                with pytest.raises(SandboxError, match="answered 413"):
                    await sb.write_file("big", b"x" * 8192)
                return await sb.read_file("small"), await sb.snapshot()
            finally:
                await client.close()

    small, snap = go(main())
    assert small == b"x" * 1000 and set(snap) == {"small"}


def test_cli_port_in_use_is_a_user_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "relayrl", "sandbox-server", "--port", str(port)], cwd=ROOT,
                              env={**os.environ, "RELAYRL_SANDBOX_TOKEN": TOKEN}, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 2 and "--host/--port" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- every number and body at the server's boundary ----


async def _raw(url: str, method: str, path: str, body: bytes | str) -> tuple[int, dict, float]:
    """Send ``body`` as it is (the client would never send NaN): (status, JSON answer, seconds)."""
    import aiohttp

    t0 = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"}) as session:
        async with session.request(method, url + path, data=body) as resp:
            return resp.status, await resp.json(content_type=None), time.monotonic() - t0


@pytest.mark.parametrize("timeout, message", [
    ("NaN", "NaN is not a number this server accepts"),
    ("Infinity", "Infinity is not a number this server accepts"),
    ("-Infinity", "-Infinity is not a number this server accepts"),
    ("1e309", "timeout: must be a positive, finite number of seconds, got inf"),  # parses as inf
    ("-1", "timeout: must be a positive, finite number of seconds, got -1"),
    ("0", "timeout: must be a positive, finite number of seconds, got 0"),
    ("true", "timeout: must be a positive, finite number of seconds, got True"),
    ('"5"', "timeout: must be a positive, finite number of seconds, got '5'"),
    ("[1]", "timeout: must be a positive, finite number of seconds, got [1]"),
])
def test_exec_timeout_must_be_a_finite_positive_number(timeout, message):
    async def main():
        async with SandboxServer(token=TOKEN, limits=SandboxLimits(timeout_s=2)) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                answer = await _raw(server.url, "POST", f"/sandboxes/{sb.id}/exec",
                                    f'{{"cmd": "sleep 1.5; echo ran", "timeout": {timeout}}}')
                return answer, await sb.exec("echo alive")
            finally:
                await client.close()

    (status, body, seconds), after = go(main())
    assert status == 400 and message in body["error"], body
    assert seconds < 1.5  # refused before anything ran
    assert after.stdout == "alive\n"


def test_a_timeout_past_the_servers_limit_runs_to_the_servers_limit():
    async def main():
        async with SandboxServer(token=TOKEN, limits=SandboxLimits(timeout_s=1)) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                return await _raw(server.url, "POST", f"/sandboxes/{sb.id}/exec",
                                  '{"cmd": "sleep 30", "timeout": 1e300}')
            finally:
                await client.close()

    status, body, seconds = go(main())
    assert status == 200 and body["timed_out"] and seconds < 10


@pytest.mark.parametrize("route, body, message", [
    ("exec", '{"cmd": 5}', "cmd: must be a string, got 5"),
    ("exec", '{"cmd": ["ls"]}', "cmd: must be a string, got ['ls']"),
    ("exec", "{}", "cmd: must be a string, got None"),
    ("exec", '["ls"]', "the body must be a JSON object, not list"),
    ("exec", "not json", "the body is not valid JSON"),
    ("exec", b"\xff\xfe", "the body is not valid JSON"),
    ("create", "[]", "the body must be a JSON object, not list"),
    ("create", '{"files": 5}', "files: must be a list of {path, content_b64}"),
    ("create", '{"files": [{"path": 1, "content_b64": ""}]}', "files[0]: must be {path: string, content_b64: string}"),
    ("create", '{"files": [{"path": "a", "content_b64": "!!"}]}', "files[0].content_b64: not base64"),
    ("create", "[" * 200_000, "the JSON body nests too deeply"),
    ("exec", "[" * 200_000, "the JSON body nests too deeply"),
    ("exec", '{"cmd": "ls", "timeout": ' + "[" * 200_000, "the JSON body nests too deeply"),
])
def test_bad_bodies_are_400_with_the_reason(route, body, message):
    async def main():
        async with SandboxServer(token=TOKEN) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                path = "/sandboxes" if route == "create" else f"/sandboxes/{sb.id}/exec"
                return await _raw(server.url, "POST", path, body), (await client.health())["sandboxes"]
            finally:
                await client.close()

    (status, answer, _), held = go(main())
    assert status == 400 and message in answer["error"], answer
    assert held == 1  # a refused create made nothing


@pytest.mark.parametrize("kwargs, message", [
    ({"max_sandboxes": 0}, "max_sandboxes: must be a positive whole number, got 0"),
    ({"max_sandboxes": True}, "max_sandboxes: must be a positive whole number, got True"),
    ({"max_sandboxes": "8"}, "max_sandboxes: must be a positive whole number, got '8'"),
    ({"max_sandboxes": 1.5}, "max_sandboxes: must be a positive whole number, got 1.5"),
    ({"idle_ttl_s": float("nan")}, "idle_ttl_s: must be a positive, finite number of seconds, got nan"),
    ({"idle_ttl_s": float("inf")}, "idle_ttl_s: must be a positive, finite number of seconds, got inf"),
    ({"idle_ttl_s": -1}, "idle_ttl_s: must be a positive, finite number of seconds, got -1"),
    ({"idle_ttl_s": "60"}, "idle_ttl_s: must be a positive, finite number of seconds, got '60'"),
    ({"max_body_bytes": 0}, "max_body_bytes: must be a positive whole number, got 0"),
    ({"port": -1}, "port: must be a whole number from 0 to 65535, got -1"),
    ({"port": 70000}, "port: must be a whole number from 0 to 65535, got 70000"),
    ({"port": True}, "port: must be a whole number from 0 to 65535, got True"),
])
def test_server_numbers_are_checked(kwargs, message):
    with pytest.raises(ValueError) as e:
        SandboxServer(token=TOKEN, **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": float("nan")}, "timeout_s: must be a positive, finite number of seconds, got nan"),
    ({"timeout_s": 0}, "timeout_s: must be a positive, finite number of seconds, got 0"),
    ({"connect_timeout_s": float("inf")}, "connect_timeout_s: must be a positive, finite number of seconds, got inf"),
    ({"connect_timeout_s": False}, "connect_timeout_s: must be a positive, finite number of seconds, got False"),
])
def test_client_numbers_are_checked(kwargs, message):
    with pytest.raises(ValueError) as e:
        RemoteSandboxProvider("http://127.0.0.1:1", token=TOKEN, **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, 0, True, "5"])
def test_client_exec_refuses_a_bad_timeout_before_sending(timeout):
    async def main():
        async with SandboxServer(token=TOKEN) as server:
            client = RemoteSandboxProvider(server.url, token=TOKEN)
            try:
                sb = await client.create()
                with pytest.raises(ValueError, match="timeout: must be a positive, finite number of seconds"):
                    await sb.exec("echo ran", timeout=timeout)
            finally:
                await client.close()

    go(main())


def test_cli_refuses_a_nan_idle_ttl():
    proc = subprocess.run([sys.executable, "-m", "relayrl", "sandbox-server", "--port", "0", "--idle-ttl", "nan"],
                          cwd=ROOT, env={**os.environ, "RELAYRL_SANDBOX_TOKEN": TOKEN}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--idle-ttl: must be a positive, finite number, got nan" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_nul_byte_reaches_the_agent_as_an_error_through_a_remote_sandbox():
    from relayrl.envs.coding import CodingEnv
    from relayrl.types import ToolCall

    task = {"id": "t", "instruction": "x", "files": [{"path": "a.py", "content": ""}],
            "hidden_tests": [{"path": "test_a.py", "content": "def test_a():\n    pass\n"}]}

    async def main():
        async with SandboxServer(token=TOKEN) as server:
            env = CodingEnv(sandbox={"kind": "remote", "url": server.url, "token": TOKEN})
            try:
                await env.reset(task)
                bad = await env.step(ToolCall("bash", {"command": "echo a\x00b"}))
                good = await env.step(ToolCall("bash", {"command": "echo alive"}))
                score = await env.score()
            finally:
                await env.close()
            return bad.observation, good.observation, score, server.provider.cgroup_limits

    bad, good, score, cgroup_limits = go(main())
    assert bad.startswith("[exit code 2]") and "the command holds a NUL byte" in bad
    assert good == "[exit code 0]\nalive" and score.reward == 1.0
    assert score.details["cgroup_limits"] == float(cgroup_limits)  # what the server reports, through /health
