"""``HttpEngineClient``: the ``Engine`` protocol over SGLang's native HTTP API.

The same client talks to relayrl's CPU engine server (``rollout.server``) and to real SGLang
servers, directly or behind ``sglang-router``:

- ``generate`` -> ``POST /generate`` with ``input_ids``, ``sampling_params`` (see
  ``SamplingParams.to_sglang``) and ``return_logprob``. Tokens and logprobs are read from
  ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` per sampled token), which
  on SGLang lists every sampled token whatever the stop-trimming of ``text``.
- ``score`` -> ``POST /generate`` with ``max_new_tokens: 0``, ``return_logprob`` and
  ``logprob_start_len: 0``; ``meta_info.input_token_logprobs[0]`` is null and becomes 0.0.
- ``update_weights`` -> ``POST /update_weights_from_disk`` on every server (``update_urls``:
  give the workers' URLs when ``urls`` is a router).
- ``health`` -> ``GET /health`` on every server; ``weight_version`` -> ``GET
  /get_weight_version``, the oldest version across servers. SGLang's versions are strings;
  one that is not an integer (SGLang's initial ``"default"``) reads as 0.

Every failure (connection refused, HTTP error, timeout, an aborted request, a malformed reply)
raises ``EngineError`` naming the URL.

Logprob temperature: the CPU engine's logprobs are ``log_softmax(logits / temperature)``. SGLang
returns temperature-scaled logprobs too unless started with ``RETURN_ORIGINAL_LOGPROB=1``; check
the version you deploy.

aiohttp sessions are bound to an event loop, so the client keeps one session per loop: it can be
shared by coroutines of one loop and used from several loops (threads) at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import weakref
from typing import Any

import aiohttp

from relayrl.rollout.engine import Completion, EngineError, GenerateRequest

__all__ = ["EngineError", "HttpEngineClient"]


def parse_weight_version(value: Any) -> int:
    """SGLang weight versions are free-form strings; relayrl's are integers ("default" -> 0)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_completion(out: dict[str, Any], prompt_len: int, url: str) -> Completion:
    """A ``Completion`` from one SGLang ``/generate`` response object."""
    try:
        meta = out["meta_info"]
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind == "abort":
            msg = reason.get("message", "aborted") if isinstance(reason, dict) else "aborted"
            raise EngineError(f"request aborted by the server: {msg}", url)
        lps = meta.get("output_token_logprobs")
        if lps is None:
            raise EngineError("response has no meta_info.output_token_logprobs (was return_logprob sent?)", url)
        ids = [int(t[1]) for t in lps]
        logprobs = [float(t[0]) for t in lps]
        return Completion(
            output_ids=ids,
            output_logprobs=logprobs,
            finish_reason="stop" if kind == "stop" else "length",
            weight_version=parse_weight_version(meta.get("weight_version")),
            prompt_tokens=int(meta.get("prompt_tokens", prompt_len)),
            cached_tokens=int(meta.get("cached_tokens") or 0),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EngineError(f"malformed /generate response ({type(e).__name__}: {e})", url) from None


def parse_input_logprobs(out: dict[str, Any], token_ids: list[int], url: str) -> list[float]:
    """Per-token logprobs from ``meta_info.input_token_logprobs`` (first entry null -> 0.0)."""
    try:
        entries = out["meta_info"]["input_token_logprobs"]
        if len(entries) != len(token_ids):
            raise EngineError(
                f"scoring returned {len(entries)} input logprobs for {len(token_ids)} tokens", url
            )
        return [0.0 if e[0] is None else float(e[0]) for e in entries]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EngineError(f"malformed scoring response ({type(e).__name__}: {e})", url) from None


class HttpEngineClient:
    """The ``Engine`` protocol over HTTP, round-robin across ``urls``.

    urls: base URLs of engine servers (``http://host:port``), or one router URL.
    timeout_s: total time allowed for one request (a long generation included).
    update_urls: servers that receive weight updates and health checks; default ``urls``.
    """

    def __init__(self, urls: list[str] | str, timeout_s: float = 600.0, update_urls: list[str] | None = None) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("HttpEngineClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.update_urls = [u.rstrip("/") for u in (update_urls or self.urls)]
        self.timeout_s = float(timeout_s)
        self._turn = itertools.count()
        self._sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession]" = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ plumbing

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            # limit=0: no cap on concurrent connections (many episodes await generations at once).
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._sessions[loop] = session
        return session

    def _pick(self) -> str:
        return self.urls[next(self._turn) % len(self.urls)]

    async def _request(self, method: str, url: str, path: str, payload: Any = None) -> Any:
        """JSON reply of ``method url+path``; EngineError on any failure."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._session().request(method, url + path, json=payload, timeout=timeout) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineError(f"{method} {path} returned HTTP {resp.status}: {_error_message(text)}", url)
                return json.loads(text) if text else None
        except asyncio.TimeoutError:
            raise EngineError(f"{method} {path} timed out after {self.timeout_s:g} s", url) from None
        except aiohttp.ClientError as e:
            raise EngineError(f"{method} {path} failed: {type(e).__name__}: {e}", url) from None
        except json.JSONDecodeError as e:
            raise EngineError(f"{method} {path} returned invalid JSON: {e}", url) from None

    # ------------------------------------------------------------------ Engine protocol

    async def generate(self, request: GenerateRequest) -> Completion:
        url = self._pick()
        payload = {
            "input_ids": list(request.input_ids),
            "sampling_params": request.sampling.to_sglang(),
            "return_logprob": True,
        }
        out = await self._request("POST", url, "/generate", payload)
        if not isinstance(out, dict):
            raise EngineError("malformed /generate response (expected one object)", url)
        return parse_completion(out, len(request.input_ids), url)

    async def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        url = self._pick()
        payload = {
            "input_ids": list(token_ids),
            "sampling_params": {"max_new_tokens": 0, "temperature": temperature},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        out = await self._request("POST", url, "/generate", payload)
        return parse_input_logprobs(out, list(token_ids), url)

    async def update_weights(self, path: str, version: int) -> None:
        """Load ``path`` on every server (concurrently); EngineError if any one fails."""

        async def one(url: str) -> None:
            out = await self._request(
                "POST", url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": str(version)}
            )
            if not (isinstance(out, dict) and out.get("success")):
                raise EngineError(f"weight update to version {version} failed: {out}", url)

        await asyncio.gather(*(one(u) for u in self.update_urls))

    async def health(self) -> bool:
        async def one(url: str) -> bool:
            try:
                await self._request("GET", url, "/health")
                return True
            except EngineError:
                return False

        return all(await asyncio.gather(*(one(u) for u in self.update_urls)))

    async def weight_version(self) -> int:
        outs = await asyncio.gather(*(self._request("GET", u, "/get_weight_version") for u in self.update_urls))
        return min(parse_weight_version(o.get("weight_version") if isinstance(o, dict) else None) for o in outs)

    # ------------------------------------------------------------------ extras

    async def flush_cache(self) -> None:
        """Drop prefix caches (SGLang) after a weight update, on every server."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)

        async def one(url: str) -> None:
            try:
                async with self._session().post(url + "/flush_cache", timeout=timeout) as resp:
                    if resp.status != 200:
                        raise EngineError(f"POST /flush_cache returned HTTP {resp.status}", url)
            except (asyncio.TimeoutError, aiohttp.ClientError) as e:
                raise EngineError(f"POST /flush_cache failed: {type(e).__name__}: {e}", url) from None

        await asyncio.gather(*(one(u) for u in self.update_urls))

    async def close(self) -> None:
        """Close the session of the current event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        session = self._sessions.pop(loop, None)
        if session is not None and not session.closed:
            await session.close()


def _error_message(text: str) -> str:
    """The message of an SGLang error body (``{"error": {"message"}}``, ``{"message"}``) or the text."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
        if isinstance(err, str):
            return err
    return text[:500]
