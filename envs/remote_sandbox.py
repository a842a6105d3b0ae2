"""Remote sandboxes: a sandbox server on CPU hosts and the client the coding env uses.

Sandboxes are CPU work (tests, builds) and scale with the number of episodes in flight, not
with GPUs, so they run best on their own hosts. ``relayrl sandbox-server`` serves local
sandboxes (``envs/local_sandbox.py``, with all their isolation) over HTTP; the coding env uses
``{kind: remote, url: ..., token: ...}`` and never notices the difference.

HTTP API (JSON unless noted; every route but ``/health`` needs ``Authorization: Bearer TOKEN``)::

    GET    /health                       {ok, network_isolated, cgroup_limits, timeout_s, sandboxes, max_sandboxes}
    POST   /sandboxes                    {files: [{path, content_b64}]} -> {id}
    POST   /sandboxes/{id}/exec          {cmd, timeout} -> {exit_code, stdout, stderr, timed_out, truncated, duration_s}
    PUT    /sandboxes/{id}/files?path=P  raw bytes -> 204
    GET    /sandboxes/{id}/files?path=P  -> raw bytes
    GET    /sandboxes/{id}/snapshot      {files: [{path, content_b64}]}
    DELETE /sandboxes/{id}               204 (also for an id already gone)

Errors: 400 ``{error, kind: "path"}`` for a path outside the workspace, 400 ``{error}`` for a
body that is not a JSON object of the route's fields (numbers finite and in range, ``NaN`` and
``Infinity`` refused, nesting bounded), 401 for a missing or wrong token, 404 for an unknown sandbox, 413 for a body over ``max_body_bytes``, 503 when the
server holds ``max_sandboxes`` (or is shutting down). A sandbox unused for ``idle_ttl_s`` is
closed by the server, so a trainer that crashed does not leak workspaces and processes forever;
SIGTERM or Ctrl-C closes every sandbox before the server exits.

The client turns every transport failure (refused, reset, timed out, 5xx) into a
``SandboxError`` naming the server and what to check: the episode fails (and is retried), the
run goes on, nothing hangs: every request has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import time
from dataclasses import asdict
from typing import Any

import aiohttp
from aiohttp import web

from .local_sandbox import LocalSandbox, LocalSandboxProvider, check_timeout
from .sandbox import ExecResult, SandboxError, SandboxLimits, SandboxPathError

log = logging.getLogger(__name__)

TOKEN_ENV = "RELAYRL_SANDBOX_TOKEN"


def _encode_files(files: dict[str, bytes | str]) -> list[dict[str, str]]:
    return [{"path": p, "content_b64": base64.b64encode(c.encode("utf-8") if isinstance(c, str) else c).decode()}
            for p, c in files.items()]


def _decode_files(entries: object) -> dict[str, bytes]:
    if not isinstance(entries, list):
        raise ValueError("files: must be a list of {path, content_b64}")
    out = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("content_b64"), str):
            raise ValueError(f"files[{i}]: must be {{path: string, content_b64: string}}")
        try:
            out[e["path"]] = base64.b64decode(e["content_b64"], validate=True)
        except binascii.Error as err:
            raise ValueError(f"files[{i}].content_b64: not base64 ({err})") from None
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number this server accepts")


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object; HTTP 400 naming the problem for anything else
    (not JSON, NaN/Infinity, nesting past the parser's depth, not an object)."""
    raw = await request.read()
    try:
        value = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except RecursionError:
        raise _bad_request("the JSON body nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the constants above
        raise _bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _bad_request(f"the body must be a JSON object, not {type(value).__name__}")
    return value


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what}: must be a positive whole number, got {value!r}")
    return value


def _positive_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be a positive, finite number of seconds, got {value!r}")
    return float(value)


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
        hidden_paths: files and directories of this host no sandbox may read (see
            ``LocalSandboxProvider``).

    Every number is checked here (ValueError naming it): a NaN or infinite one would disable
    the bound it sets.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_sandboxes: int = 64, idle_ttl_s: float = 900.0, limits: SandboxLimits | None = None,
                 root: str | None = None, max_body_bytes: int = 64 << 20,
                 hidden_paths: list[str] | None = None) -> None:
        if token is None and not is_loopback(host):
            raise ValueError("a sandbox server on a non-loopback address needs a token")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token: must be a non-empty string or None")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port: must be a whole number from 0 to 65535, got {port!r}")
        if limits is not None and not isinstance(limits, SandboxLimits):
            raise ValueError(f"limits: must be a SandboxLimits, got {type(limits).__name__}")
        self.host, self.port = host, port
        self.token = token
        self.max_sandboxes = _positive_int(max_sandboxes, "max_sandboxes")
        self.idle_ttl_s = _positive_seconds(idle_ttl_s, "idle_ttl_s")
        self.max_body_bytes = _positive_int(max_body_bytes, "max_body_bytes")
        self.provider = LocalSandboxProvider(limits, root=root, hidden_paths=hidden_paths)
        self._sandboxes: dict[str, _Entry] = {}
        self._creating = 0  # creates in flight hold a slot, so concurrent ones cannot overshoot
        self._stopping = False
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
        """Close every sandbox (killing commands still running: their requests answer with the
        killed result), then stop serving."""
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await self._close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._close_all()  # any create that was still in flight

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
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return web.json_response({"error": "missing or wrong token"}, status=401)
        try:
            return await handler(request)
        except SandboxPathError as e:
            return web.json_response({"error": str(e), "kind": "path"}, status=400)
        except SandboxError as e:
            return web.json_response({"error": str(e), "kind": "sandbox"}, status=500)
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        except RecursionError:
            return web.json_response({"error": "bad request: nested too deeply"}, status=400)

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

    async def _close_all(self) -> None:
        results = await asyncio.gather(*(self._close(sid) for sid in list(self._sandboxes)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("closing a sandbox failed: %r", r)

    async def _reap(self) -> None:
        period = max(min(self.idle_ttl_s / 4, 30.0), 0.05)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sid, entry in list(self._sandboxes.items()):
                if entry.busy == 0 and now - entry.last_used > self.idle_ttl_s:
                    log.info("closing sandbox %s after %.0fs idle", sid, now - entry.last_used)
                    try:
                        await self._close(sid)
                    except Exception:  # one bad workspace must not stop the reaping of the rest
                        log.exception("closing idle sandbox %s failed", sid)

    # -- routes --

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "network_isolated": self.provider.network_isolated,
                                  "cgroup_limits": self.provider.cgroup_limits,
                                  "timeout_s": self.provider.limits.timeout_s,
                                  "sandboxes": len(self._sandboxes), "max_sandboxes": self.max_sandboxes})

    async def _create(self, request: web.Request) -> web.Response:
        if self._stopping:
            return web.json_response({"error": "the server is shutting down"}, status=503)
        if len(self._sandboxes) + self._creating >= self.max_sandboxes:
            return web.json_response({"error": f"the server holds its maximum of {self.max_sandboxes} sandboxes "
                                      "(close finished ones, raise --max-sandboxes, or add servers)"}, status=503)
        self._creating += 1
        try:
            body = await _json_object(request)
            sandbox = await self.provider.create(_decode_files(body.get("files", [])))
        finally:
            self._creating -= 1
        sid = secrets.token_hex(12)
        self._sandboxes[sid] = _Entry(sandbox)
        return web.json_response({"id": sid})

    async def _exec(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        body = await _json_object(request)
        cmd = body.get("cmd")
        if not isinstance(cmd, str):
            raise _bad_request(f"cmd: must be a string, got {cmd!r:.100}")
        timeout = body.get("timeout")
        if timeout is not None:  # never past the server's own timeout_s: exec takes the smaller
            timeout = check_timeout(timeout)
        entry.busy += 1
        try:
            result = await entry.sandbox.exec(cmd, timeout)
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
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # both end in stop(): no workspace or process left
            loop.add_signal_handler(sig, done.set)
        isolated = server.provider.network_isolated
        print(f"relayrl sandbox server on {server.url} ({'token auth' if token else 'NO AUTH, loopback only'}; "
              f"network isolation: {'yes' if isolated else 'NO'}; up to {max_sandboxes} sandboxes)", flush=True)
        try:
            await done.wait()
        finally:
            await server.stop()
        print("relayrl sandbox server stopped; every sandbox closed", flush=True)

    asyncio.run(main())


# ---------------------------------------------------------------------------- client


class RemoteSandboxProvider:
    """Sandboxes on a ``relayrl sandbox-server``.

    Args:
        url: the server, e.g. ``http://10.0.0.5:8700``.
        token: its token (default: ``$RELAYRL_SANDBOX_TOKEN``).
        timeout_s: deadline of a request that runs no command (an exec's deadline is its command
            timeout, at most the server's, plus this).
        connect_timeout_s: deadline to connect.

    ``network_isolated``, ``cgroup_limits`` and ``server_timeout_s`` are what the server reports
    (``GET /health``), known after the first ``create()``.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV)) or None
        self.timeout_s = _positive_seconds(timeout_s, "timeout_s")
        self.connect_timeout_s = _positive_seconds(connect_timeout_s, "connect_timeout_s")
        self.network_isolated: bool | None = None  # known after the first create()
        self.cgroup_limits: bool | None = None
        self.server_timeout_s: float | None = None
        self._session: aiohttp.ClientSession | None = None
        self._open: set[RemoteSandbox] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            # No pool limit: a request queued for a connection would spend its deadline waiting,
            # and the server bounds the work anyway (max_sandboxes).
            self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
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
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
            raise SandboxError(f"{where} dropped the connection during {method} {path} ({type(e).__name__}); "
                               "did it crash or restart? Check its log") from None
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
            health = await self.health()
            timeout = health.get("timeout_s")
            self.server_timeout_s = timeout if isinstance(timeout, (int, float)) and math.isfinite(timeout) else None
            self.network_isolated = bool(health.get("network_isolated"))
            self.cgroup_limits = bool(health.get("cgroup_limits"))
        body = await self.request("POST", "/sandboxes", json={"files": _encode_files(files or {})})
        sandbox = RemoteSandbox(self, json.loads(body)["id"])
        self._open.add(sandbox)
        return sandbox

    async def close(self) -> None:
        # All at once: against a host that went dark, each DELETE waits out its connect deadline.
        results = await asyncio.gather(*(sb.close() for sb in list(self._open)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # the server is gone or busy; its idle reaper closes what is left
            log.warning("%d sandbox(es) on %s not closed: %s", len(failed), self.url, failed[0])
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
        if timeout is not None:
            timeout = check_timeout(timeout)
        # The server never runs a command past its own timeout_s, whatever ``timeout`` says.
        limit = [t for t in (timeout, self.provider.server_timeout_s) if t is not None]
        deadline = (min(limit) if limit else 600.0) + self.provider.timeout_s
        body = await self.provider.request("POST", f"/sandboxes/{self.id}/exec", timeout_s=deadline,
                                           json={"cmd": cmd, "timeout": timeout})
        return ExecResult(**json.loads(body))

    async def write_file(self, path: str, data: bytes | str) -> None:
        payload = data.encode("utf-8", errors="replace") if isinstance(data, str) else bytes(data)
        await self.provider.request("PUT", f"/sandboxes/{self.id}/files", params={"path": _query_path(path)},
                                    data=payload)

    async def read_file(self, path: str) -> bytes:
        return await self.provider.request("GET", f"/sandboxes/{self.id}/files", params={"path": _query_path(path)})

    async def snapshot(self) -> dict[str, bytes]:
        return _decode_files(json.loads(await self.provider.request("GET", f"/sandboxes/{self.id}/snapshot"))["files"])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.provider._open.discard(self)
        await self.provider.request("DELETE", f"/sandboxes/{self.id}")


def _query_path(path: str) -> str:
    """``path`` as a query value; SandboxPathError for one a URL cannot carry intact (the URL
    library would silently drop a lone surrogate)."""
    if not isinstance(path, str):
        raise SandboxPathError(f"invalid path {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise SandboxPathError(f"invalid path {path!r}: not valid UTF-8 text") from None
    return path
