"""Remote sandboxes: a sandbox server on CPU hosts and the client the coding env uses.

Sandboxes are CPU work (tests, builds) and scale with the number of episodes in flight, not
with GPUs, so they run best on their own hosts. ``relayrl sandbox-server`` serves local
sandboxes (``envs/local_sandbox.py``, with all their isolation) over HTTP; the coding env uses
``{kind: remote, url: ..., token: ...}`` and never notices the difference.

HTTP API (JSON unless noted; every route but ``/health`` needs ``Authorization: Bearer TOKEN``)::

    GET    /health                       {ok, network_isolated, sandboxes, max_sandboxes}
    POST   /sandboxes                    {files: [{path, content_b64}]} -> {id}
    POST   /sandboxes/{id}/exec          {cmd, timeout} -> {exit_code, stdout, stderr, timed_out, truncated, duration_s}
    PUT    /sandboxes/{id}/files?path=P  raw bytes -> 204
    GET    /sandboxes/{id}/files?path=P  -> raw bytes
    GET    /sandboxes/{id}/snapshot      {files: [{path, content_b64}]}
    DELETE /sandboxes/{id}               204 (also for an id already gone)

Errors: 400 ``{error, kind: "path"}`` for a path outside the workspace, 401 for a missing or
wrong token, 404 for an unknown sandbox, 503 when the server holds ``max_sandboxes``. A
sandbox unused for ``idle_ttl_s`` is closed by the server, so a trainer that crashed does not
leak workspaces and processes forever.

The client turns every transport failure (refused, reset, timed out, 5xx) into a
``SandboxError`` naming the server and what to check: the episode fails (and is retried), the
run goes on, nothing hangs: every request has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from dataclasses import asdict
from typing import Any

import aiohttp
from aiohttp import web

from .local_sandbox import LocalSandbox, LocalSandboxProvider
from .sandbox import ExecResult, SandboxError, SandboxLimits, SandboxPathError

log = logging.getLogger(__name__)

TOKEN_ENV = "RELAYRL_SANDBOX_TOKEN"


def _encode_files(files: dict[str, bytes | str]) -> list[dict[str, str]]:
    return [{"path": p, "content_b64": base64.b64encode(c.encode("utf-8") if isinstance(c, str) else c).decode()}
            for p, c in files.items()]


def _decode_files(entries: list[dict[str, str]]) -> dict[str, bytes]:
    return {e["path"]: base64.b64decode(e["content_b64"]) for e in entries}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- server


class _Entry:
    def __init__(self, sandbox: LocalSandbox) -> None:
        self.sandbox = sandbox
        self.last_used = time.monotonic()
        self.busy = 0


class SandboxServer:
    """Serves local sandboxes over HTTP. ``async with SandboxServer(...) as server`` for tests
    (``server.port`` is the bound port; port 0 picks a free one); ``serve(...)`` for the CLI.

    Args:
        token: the bearer token; None = no authentication (only allowed on loopback).
        max_sandboxes: sandboxes open at once; more are refused with 503.
        idle_ttl_s: a sandbox unused this long is closed.
        limits, root: of the local sandboxes (see ``LocalSandboxProvider``).
        max_body_bytes: the largest request accepted.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_sandboxes: int = 64, idle_ttl_s: float = 900.0, limits: SandboxLimits | None = None,
                 root: str | None = None, max_body_bytes: int = 64 << 20) -> None:
        if token is None and not is_loopback(host):
            raise ValueError("a sandbox server on a non-loopback address needs a token")
        self.host, self.port = host, port
        self.token = token
        self.max_sandboxes = max_sandboxes
        self.idle_ttl_s = idle_ttl_s
        self.provider = LocalSandboxProvider(limits, root=root)
        self.max_body_bytes = max_body_bytes
        self._sandboxes: dict[str, _Entry] = {}
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task | None = None

    # -- lifecycle --

    async def start(self) -> int:
        app = web.Application(middlewares=[self._auth], client_max_size=self.max_body_bytes)
        app.add_routes([
            web.get("/health", self._health),
            web.post("/sandboxes", self._create),
            web.post("/sandboxes/{id}/exec", self._exec),
            web.put("/sandboxes/{id}/files", self._write),
            web.get("/sandboxes/{id}/files", self._read),
            web.get("/sandboxes/{id}/snapshot", self._snapshot),
            web.delete("/sandboxes/{id}", self._delete),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._reaper = asyncio.create_task(self._reap())
        return self.port

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for sid in list(self._sandboxes):
            await self._close(sid)
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "SandboxServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- plumbing --

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.token is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return web.json_response({"error": "missing or wrong token"}, status=401)
        try:
            return await handler(request)
        except SandboxPathError as e:
            return web.json_response({"error": str(e), "kind": "path"}, status=400)
        except SandboxError as e:
            return web.json_response({"error": str(e), "kind": "sandbox"}, status=500)
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)

    def _entry(self, request: web.Request) -> _Entry:
        entry = self._sandboxes.get(request.match_info["id"])
        if entry is None:
            raise web.HTTPNotFound(text='{"error": "no such sandbox (closed, or reaped after idling)"}',
                                   content_type="application/json")
        entry.last_used = time.monotonic()
        return entry

    async def _close(self, sid: str) -> None:
        entry = self._sandboxes.pop(sid, None)
        if entry is not None:
            await entry.sandbox.close()

    async def _reap(self) -> None:
        period = max(min(self.idle_ttl_s / 4, 30.0), 0.05)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sid, entry in list(self._sandboxes.items()):
                if entry.busy == 0 and now - entry.last_used > self.idle_ttl_s:
                    log.info("closing sandbox %s after %.0fs idle", sid, now - entry.last_used)
                    await self._close(sid)

    # -- routes --

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "network_isolated": self.provider.network_isolated,
                                  "sandboxes": len(self._sandboxes), "max_sandboxes": self.max_sandboxes})

    async def _create(self, request: web.Request) -> web.Response:
        if len(self._sandboxes) >= self.max_sandboxes:
            return web.json_response({"error": f"the server holds its maximum of {self.max_sandboxes} sandboxes"},
                                     status=503)
        body = await request.json()
        sid = secrets.token_hex(12)
        self._sandboxes[sid] = _Entry(await self.provider.create(_decode_files(body.get("files", []))))
        return web.json_response({"id": sid})

    async def _exec(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        body = await request.json()
        entry.busy += 1
        try:
            result = await entry.sandbox.exec(str(body["cmd"]), body.get("timeout"))
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()
        return web.json_response(asdict(result))

    async def _write(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        await entry.sandbox.write_file(request.query["path"], await request.read())
        return web.Response(status=204)

    async def _read(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        return web.Response(body=await entry.sandbox.read_file(request.query["path"]),
                            content_type="application/octet-stream")

    async def _snapshot(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        return web.json_response({"files": _encode_files(await entry.sandbox.snapshot())})

    async def _delete(self, request: web.Request) -> web.Response:
        await self._close(request.match_info["id"])
        return web.Response(status=204)


def serve(host: str, port: int, token: str | None, max_sandboxes: int, idle_ttl_s: float,
          limits: SandboxLimits, root: str | None = None) -> None:
    """Run a sandbox server until interrupted (the ``relayrl sandbox-server`` command)."""

    async def main() -> None:
        server = SandboxServer(host, port, token, max_sandboxes, idle_ttl_s, limits, root)
        await server.start()
        isolated = server.provider.network_isolated
        print(f"relayrl sandbox server on {server.url} ({'token auth' if token else 'NO AUTH, loopback only'}; "
              f"network isolation: {'yes' if isolated else 'NO'}; up to {max_sandboxes} sandboxes)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- client


class RemoteSandboxProvider:
    """Sandboxes on a ``relayrl sandbox-server``.

    Args:
        url: the server, e.g. ``http://10.0.0.5:8700``.
        token: its token (default: ``$RELAYRL_SANDBOX_TOKEN``).
        timeout_s: deadline of a request that runs no command (an exec's deadline is its command
            timeout plus this).
        connect_timeout_s: deadline to connect.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.network_isolated: bool | None = None  # known after the first create()
        self._session: aiohttp.ClientSession | None = None
        self._open: set[RemoteSandbox] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def request(self, method: str, path: str, *, timeout_s: float | None = None, **kwargs: Any) -> bytes:
        """One request; every failure is a ``SandboxError`` (``SandboxPathError`` for 400 paths)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s, sock_connect=self.connect_timeout_s)
        where = f"sandbox server {self.url}"
        try:
            async with self._client().request(method, self.url + path, timeout=timeout, **kwargs) as resp:
                body = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise SandboxError(f"{where} did not answer {method} {path} within {timeout.total:g}s") from None
        except aiohttp.ClientConnectorError as e:
            raise SandboxError(f"{where} is unreachable ({e.os_error or e}); is `relayrl sandbox-server` "
                               "running there, and is the URL right?") from None
        except aiohttp.ClientError as e:
            raise SandboxError(f"{where} failed on {method} {path}: {type(e).__name__}: {e}") from None
        if status < 300:
            return body
        error = _error(body)
        message = str(error.get("error", ""))
        if status == 401:
            raise SandboxError(f"{where} rejected the token: set env.kwargs.sandbox.token or ${TOKEN_ENV} "
                               "to the server's token")
        if status == 400 and error.get("kind") == "path":
            raise SandboxPathError(message)
        raise SandboxError(f"{where} answered {status} to {method} {path}: {message}")

    async def health(self) -> dict[str, Any]:
        return json.loads(await self.request("GET", "/health"))

    async def create(self, files: dict[str, bytes | str] | None = None) -> "RemoteSandbox":
        if self.network_isolated is None:
            self.network_isolated = bool((await self.health()).get("network_isolated"))
        body = await self.request("POST", "/sandboxes", json={"files": _encode_files(files or {})})
        sandbox = RemoteSandbox(self, json.loads(body)["id"])
        self._open.add(sandbox)
        return sandbox

    async def close(self) -> None:
        for sandbox in list(self._open):
            try:
                await sandbox.close()
            except SandboxError:
                pass  # the server is gone; its reaper closes what is left
        self._open.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
        if isinstance(value, dict):
            return value
    except ValueError:
        pass
    return {"error": body[:300].decode("utf-8", errors="replace")}


class RemoteSandbox:
    def __init__(self, provider: RemoteSandboxProvider, sandbox_id: str) -> None:
        self.provider = provider
        self.id = sandbox_id
        self._closed = False

    async def exec(self, cmd: str, timeout: float | None = None) -> ExecResult:
        if self._closed:
            raise SandboxError("exec on a closed sandbox")
        deadline = (timeout if timeout is not None else 600.0) + self.provider.timeout_s
        body = await self.provider.request("POST", f"/sandboxes/{self.id}/exec", timeout_s=deadline,
                                           json={"cmd": cmd, "timeout": timeout})
        return ExecResult(**json.loads(body))

    async def write_file(self, path: str, data: bytes | str) -> None:
        payload = data.encode("utf-8", errors="replace") if isinstance(data, str) else bytes(data)
        await self.provider.request("PUT", f"/sandboxes/{self.id}/files", params={"path": path}, data=payload)

    async def read_file(self, path: str) -> bytes:
        return await self.provider.request("GET", f"/sandboxes/{self.id}/files", params={"path": path})

    async def snapshot(self) -> dict[str, bytes]:
        return _decode_files(json.loads(await self.provider.request("GET", f"/sandboxes/{self.id}/snapshot"))["files"])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.provider._open.discard(self)
        await self.provider.request("DELETE", f"/sandboxes/{self.id}")
