"""An HTTP server speaking SGLang's native API over a ``CpuEngine``.

The subset relayrl's ``HttpEngineClient`` (and slime-style rollout code) uses, with SGLang's
request and response shapes, so the same client drives this server and a real SGLang fleet:

- ``GET /health``, ``GET /health_generate`` (runs a one-token generation)
- ``GET /get_server_info``, ``GET /get_model_info`` (``model_path``, ``is_generation``)
- ``GET /get_weight_version`` -> ``{"weight_version": "3"}`` (SGLang versions are strings)
- ``POST /generate`` with ``input_ids`` (one list or a batch of lists; ``text`` too when a
  tokenizer is loaded), ``sampling_params``, ``return_logprob``, ``logprob_start_len``. A response
  is ``{"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": "stop", "matched": id}
  | {"type": "length", "length": n}, "prompt_tokens", "completion_tokens", "cached_tokens",
  "weight_version", "output_token_logprobs": [[logprob, id, null], ...], "input_token_logprobs":
  [[null, id0, null], [logprob, id1, null], ...]}}``; a batch returns a list of them. Scoring is
  ``max_new_tokens: 0`` with ``return_logprob`` and ``logprob_start_len: 0`` (as on SGLang).
- ``POST /update_weights_from_disk`` ``{"model_path", "weight_version"}`` -> ``{"success",
  "message", "num_paused_requests"}``; the engine keeps decoding in-flight requests with the
  new weights (SGLang without ``abort_all_requests``).
- ``POST /flush_cache``: drops the engine's kept prefixes (the keys and values finished
  sequences leave for a next turn to continue); running requests go on.
- ``POST /init_weights_update_group`` ``{"master_address", "master_port", "rank_offset",
  "world_size", "group_name", "backend"}``, ``POST /update_weights_from_distributed``
  ``{"names", "dtypes", "shapes", "group_name", "weight_version"}`` (the tensors arrive by
  ``broadcast`` from rank 0 of that group, in ``names`` order) and ``POST
  /destroy_weights_update_group``: SGLang's NCCL weight sync, here over gloo. Buckets are staged
  and the new version is applied, all at once, when every weight of the model has arrived.

Errors are HTTP 400 with ``{"error": {"message": ...}}`` (SGLang's shape), e.g. a prompt longer
than the engine's ``max_seq_len``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web

from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.engine import Completion, EngineError, GenerateRequest, SamplingParams

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request body is malformed; answered with HTTP 400 and the message."""


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _as_list(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast a per-request field to ``n`` items (SGLang allows a scalar or a list)."""
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {n} prompts")
        return value
    return [value] * n


def finish_reason_json(c: Completion) -> dict[str, Any]:
    """SGLang's finish reason object: FINISH_MATCHED_TOKEN or FINISH_LENGTH."""
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.output_ids[-1]}
    return {"type": "length", "length": len(c.output_ids)}


class EngineServer:
    """aiohttp handlers over one ``CpuEngine``.

    tokenizer: optional HF tokenizer for ``text`` in and out; without it ``text`` is "" (like
    SGLang's ``--skip-tokenizer-init``) and prompts must be ``input_ids``.
    """

    def __init__(self, engine: CpuEngine, tokenizer: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._update_lock = asyncio.Lock()
        self._groups: dict[str, Any] = {}
        self._staged: dict[str, Any] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health_generate)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_weight_version", self.get_weight_version)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        app.router.add_route("*", "/flush_cache", self.flush_cache)
        app.router.add_post("/init_weights_update_group", self.init_weights_update_group)
        app.router.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        app.router.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        return app

    # ------------------------------------------------------------------ info

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.is_healthy():
            return web.Response(status=503, text="engine is not running")
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        try:
            await self.engine.generate(GenerateRequest([0], SamplingParams(max_new_tokens=1, temperature=0.0)))
        except EngineError as e:
            return web.Response(status=503, text=str(e))
        return web.Response(status=200)

    def _version(self) -> str:
        return str(self.engine.current_weight_version())

    async def server_info(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response(
            {
                "version": "relayrl-cpu-engine",
                "model_path": e.model_path,
                "tokenizer_path": e.model_path if self.tokenizer is not None else None,
                "skip_tokenizer_init": self.tokenizer is None,
                "max_running_requests": e.max_batch_size,
                "context_length": e.max_seq_len,
                "max_prefill_tokens": e.max_prefill_tokens,
                "num_threads": e.num_threads,
                "weight_version": self._version(),
                "stats": dict(e.stats),
            }
        )

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.engine.model_path,
                "tokenizer_path": self.engine.model_path if self.tokenizer is not None else None,
                "is_generation": True,
                "weight_version": self._version(),
            }
        )

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self._version()})

    async def flush_cache(self, request: web.Request) -> web.Response:
        dropped = await asyncio.wrap_future(self.engine.flush_cache())
        return web.Response(status=200, text=f"Cache flushed ({dropped} kept prefixes dropped).")

    # ------------------------------------------------------------------ generate

    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            items, is_batch = self._parse_generate(body)
            # A batch arrives at the engine at once (one prefill; a shared prompt computed once).
            futures = self.engine.submit_many([GenerateRequest(ids, params) for ids, params, _, _ in items])
            outs = await asyncio.gather(*(self._one(fut, *item) for fut, item in zip(futures, items)))
        except BadRequest as e:
            return _error(str(e))
        except EngineError as e:
            return _error(str(e))
        except ValueError as e:  # invalid JSON
            return _error(f"invalid request body: {e}")
        return web.json_response(outs if is_batch else outs[0])

    def _parse_generate(self, body: Any) -> tuple[list[tuple[list[int], SamplingParams, bool, int]], bool]:
        """((input_ids, sampling, return_logprob, logprob_start_len) per prompt, is_batch)."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the CPU engine server")
        prompts, is_batch = self._prompts(body)
        n = len(prompts)
        sps = _as_list(body.get("sampling_params") or {}, n, "sampling_params")
        want_lp = _as_list(bool(body.get("return_logprob") or False), n, "return_logprob")
        starts = _as_list(body.get("logprob_start_len", -1), n, "logprob_start_len")
        items = []
        for ids, sp, lp, start in zip(prompts, sps, want_lp, starts):
            if not isinstance(sp, dict):
                raise BadRequest("sampling_params must be an object (or a list of objects)")
            try:
                params = SamplingParams.from_sglang(sp)
            except (TypeError, ValueError) as e:
                raise BadRequest(f"sampling_params: {e}") from None
            items.append((ids, params, bool(lp), -1 if start is None else int(start)))
        return items, is_batch

    def _prompts(self, body: dict[str, Any]) -> tuple[list[list[int]], bool]:
        """The prompts as token ids, and whether the input was a batch (a list of prompts)."""
        ids = body.get("input_ids")
        if ids is None and body.get("text") is not None:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer; this server was started without one, send input_ids")
            text = body["text"]
            texts = text if isinstance(text, list) else [text]
            return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts], isinstance(text, list)
        if ids is None:
            raise BadRequest("give input_ids (a list of token ids, or a list of such lists)")
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids must be a non-empty list of token ids (or of lists)")
        is_batch = isinstance(ids[0], list)
        batch = ids if is_batch else [ids]
        for p in batch:
            if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise BadRequest("input_ids must contain only integer token ids")
        return batch, is_batch

    async def _one(self, fut: Future, ids: list[int], params: SamplingParams, want_lp: bool, start: int) -> dict[str, Any]:
        gen = asyncio.wrap_future(fut)
        if want_lp and start >= 0:
            completion, input_lps = await asyncio.gather(gen, self.engine.score(ids, params.temperature))
        else:
            completion, input_lps = await gen, None
        meta: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish_reason_json(completion),
            "prompt_tokens": len(ids),
            "completion_tokens": len(completion.output_ids),
            "cached_tokens": completion.cached_tokens,
            "weight_version": str(completion.weight_version),
        }
        if want_lp:
            meta["output_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(completion.output_logprobs, completion.output_ids)
            ]
            if input_lps is not None:
                # SGLang has no logprob for the first prompt token: None, not a made-up 0.
                meta["input_token_logprobs"] = [
                    [None if i == 0 else input_lps[i], ids[i], None] for i in range(start, len(ids))
                ]
        text = self.tokenizer.decode(completion.output_ids) if self.tokenizer is not None else ""
        return {"text": text, "output_ids": completion.output_ids, "meta_info": meta}

    # ------------------------------------------------------------------ weights

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            path = body["model_path"]
            version = body.get("weight_version")
            version = self.engine.current_weight_version() if version is None else int(version)
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response(
                {"success": False, "message": f"bad request: {e!r}; send model_path and an integer weight_version"},
                status=400,
            )
        async with self._update_lock:
            try:
                await self.engine.update_weights(path, version)
            except EngineError as e:
                return web.json_response({"success": False, "message": str(e), "num_paused_requests": 0}, status=400)
        return web.json_response(
            {"success": True, "message": f"Succeeded to update model weights (version {version}).", "num_paused_requests": 0}
        )


    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        from relayrl.rollout.sglang_engine import init_weight_update_group

        try:
            b = await request.json()
            args = (b.get("backend", "gloo"), str(b["master_address"]), int(b["master_port"]), int(b["rank_offset"]),
                    int(b["world_size"]), str(b.get("group_name", "weight_update_group")))
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"success": False, "message": f"bad request: {e!r}"}, status=400)
        if args[0] != "gloo":
            return web.json_response({"success": False, "message": f"the CPU engine syncs over gloo, not {args[0]}"},
                                     status=400)
        try:
            pg = await asyncio.get_running_loop().run_in_executor(None, lambda: init_weight_update_group(*args))
        except Exception as e:  # noqa: BLE001 - reported to the trainer
            return web.json_response({"success": False, "message": f"joining the group failed: {e}"}, status=400)
        self._groups[args[-1]] = pg
        return web.json_response({"success": True, "message": f"joined {args[-1]} as rank {args[3]}"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        import torch
        import torch.distributed as dist

        try:
            b = await request.json()
            pg = self._groups[b.get("group_name", "weight_update_group")]
            specs = list(zip(b["names"], b["dtypes"], b["shapes"], strict=True))
            version = b.get("weight_version")
            version = None if version is None else int(version)
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"success": False, "message": f"bad request (or no such group): {e!r}"}, status=400)

        def receive() -> dict[str, Any]:
            out = {}
            for name, dtype, shape in specs:
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, src=0, group=pg)
                out[name] = t
            return out

        async with self._update_lock:
            try:
                self._staged.update(await asyncio.get_running_loop().run_in_executor(None, receive))
            except Exception as e:  # noqa: BLE001
                return web.json_response({"success": False, "message": f"receiving weights failed: {e}"}, status=400)
            needed = self.engine.model.weight_names()
            if all(n in self._staged for n in needed):
                state, self._staged = self._staged, {}
                v = self.engine.current_weight_version() if version is None else version
                try:
                    await asyncio.wrap_future(self.engine.submit_weights(state, v))
                except EngineError as e:
                    return web.json_response({"success": False, "message": str(e)}, status=400)
        return web.json_response({"success": True, "message": f"received {len(specs)} tensors"})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        from relayrl.rollout.sglang_engine import destroy_weight_update_group

        try:
            b = await request.json()
        except ValueError:
            b = {}
        pg = self._groups.pop(b.get("group_name", "weight_update_group"), None)
        if pg is not None:
            destroy_weight_update_group(pg)
        return web.json_response({"success": True, "message": "destroyed" if pg is not None else "no such group"})


# ---------------------------------------------------------------------------- running it


def load_tokenizer(model_path: str | Path) -> Any:
    """The checkpoint's HF tokenizer, or None if it has none."""
    p = Path(model_path)
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(p)


class ServerHandle:
    """An ``EngineServer`` running on its own event loop in a background thread.

    url: ``http://host:port`` it is reachable at (the bound port when started with port 0).
    """

    def __init__(self, server: EngineServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = self._sock.getsockname()[1]
        reach = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{reach}:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-server-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"engine server failed to start on {host}:{self.port}: {self._error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.server.app(), access_log=None, handle_signals=False)
        try:
            self._loop.run_until_complete(runner.setup())
            site = web.SockSite(runner, self._sock, shutdown_timeout=1.0)
            self._loop.run_until_complete(site.start())
        except BaseException as e:  # noqa: BLE001 - reported by __init__
            self._error = e
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (the engine is not shut down; see ``shutdown``)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def shutdown(self) -> None:
        """Stop serving and shut the engine down."""
        self.stop()
        self.server.engine.shutdown()


def start_server_thread(
    engine: CpuEngine, host: str = "127.0.0.1", port: int = 0, tokenizer: Any = None
) -> ServerHandle:
    """Serve ``engine`` in a background thread; returns once it accepts connections."""
    return ServerHandle(EngineServer(engine, tokenizer), host, port)


def start_engine_server(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    with_tokenizer: bool = True,
    **engine_kwargs: Any,
) -> ServerHandle:
    """Build a ``CpuEngine`` for ``model_path`` and serve it in a background thread.

    with_tokenizer: load the checkpoint's tokenizer for ``text`` in/out (False: ids only).
    """
    engine = CpuEngine(model_path, **engine_kwargs)
    tokenizer = load_tokenizer(model_path) if with_tokenizer else None
    return start_server_thread(engine, host, port, tokenizer)


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 30000, **engine_kwargs: Any) -> None:
    """Serve until interrupted (Ctrl-C), then shut down cleanly."""
    handle = start_engine_server(model_path, host, port, **engine_kwargs)
    print(f"relayrl CPU engine serving {model_path} at {handle.url}", flush=True)
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a model with relayrl's CPU engine over SGLang's HTTP API.")
    ap.add_argument("--model-path", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prefix-reuse-min-tokens", type=int, default=16,
                    help="continue a finished sequence's cached prefix when a prompt starts with this many of its tokens (0 = off)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(
        args.model_path,
        args.host,
        args.port,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        num_threads=args.num_threads,
        dtype=args.dtype,
        min_prefix_reuse=args.prefix_reuse_min_tokens,
    )


if __name__ == "__main__":
    main()
