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
                return r, read, snap, client.network_isolated
            finally:
                await client.close()

    r, read, snap, isolated = go(main())
    assert r.exit_code == 5 and r.stdout == "3\n" and r.stderr == "\ufffd"
    assert read == "né".encode()
    assert snap == {"a.txt": b"A", "b/c.bin": b"\xff\x00", "new.txt": "né".encode()}
    assert isolated is True


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


def test_server_killed_mid_command_is_a_sandbox_error():
    port = free_port()
    env = {**os.environ, "RELAYRL_SANDBOX_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "relayrl", "sandbox-server", "--port", str(port), "--timeout", "60"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"relayrl sandbox server on http://127.0.0.1:{port}" in banner and "token auth" in banner

        async def main():
            client = RemoteSandboxProvider(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=5)
            try:
                sb = await client.create()
                task = asyncio.create_task(sb.exec("sleep 50", timeout=55))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                with pytest.raises(SandboxError) as e:
                    await task
                return str(e.value)
            finally:
                await client.close()

        message = go(main())
        assert f"sandbox server http://127.0.0.1:{port}" in message
    finally:
        proc.kill()
        proc.wait()


def test_cli_refuses_to_serve_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "RELAYRL_SANDBOX_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "relayrl", "sandbox-server", "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs a token" in proc.stderr and "Traceback" not in proc.stderr


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
