"""Engine servers as Ray actors: each actor holds a ``CpuEngine`` and its HTTP server in-process.

Rollout workers reach the engines over HTTP (``HttpEngineClient``), exactly as they would reach
SGLang servers on GPUs; the actor handle is only for the driver's lifecycle calls (URL, weight
update, shutdown). Ray ``.remote()`` calls live here and in the driver only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relayrl.config import EngineConfig
from relayrl.rollout.server import ServerHandle, start_engine_server


class EngineServerActor:
    """A ``CpuEngine`` served over SGLang's HTTP API (usable as a plain class, or under Ray).

    host: interface to bind; with ``0.0.0.0`` the URL names this node's IP (as Ray sees it).
    port: 0 picks a free port.
    """

    def __init__(
        self,
        model_path: str,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        num_threads: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        dtype: str = "float32",
        seed: int = 0,
        prefix_reuse_min_tokens: int = 16,
    ) -> None:
        self._handle: ServerHandle = start_engine_server(
            model_path,
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            num_threads=num_threads,
            dtype=dtype,
            seed=seed,
            min_prefix_reuse=prefix_reuse_min_tokens,
        )
        self._url = self._handle.url
        if host in ("0.0.0.0", ""):
            self._url = f"http://{_node_ip()}:{self._handle.port}"

    def url(self) -> str:
        return self._url

    def update_weights(self, path: str, version: int) -> float:
        """Load an HF safetensors dir in place; returns the seconds decoding was paused."""
        return self._handle.server.engine.load_weights(path, version)

    def weight_version(self) -> int:
        return self._handle.server.engine.current_weight_version()

    def health(self) -> bool:
        """The engine loop is alive (a dead actor process raises instead; both count as down)."""
        return self._handle.server.engine.is_healthy()

    def stats(self) -> dict[str, Any]:
        return dict(self._handle.server.engine.stats)

    def shutdown(self) -> None:
        self._handle.shutdown()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def launch_cpu_engines(
    cfg: EngineConfig, model_path: str | Path, num_cpus_per_engine: float = 1, seed: int = 0
) -> tuple[list[Any], list[str]]:
    """Start ``cfg.num_engines`` engine-server actors; return (actor handles, base URLs).

    Each engine uses ``cfg.num_threads`` torch threads, or ``num_cpus_per_engine`` if unset. Blocks
    until every server accepts connections (model loading included).
    """
    import ray

    threads = cfg.num_threads or max(1, int(num_cpus_per_engine))
    actor_cls = ray.remote(num_cpus=num_cpus_per_engine)(EngineServerActor)
    actors = [
        actor_cls.remote(
            str(model_path),
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
            num_threads=threads,
            host=cfg.host,
            port=0,
            seed=seed + i,
            prefix_reuse_min_tokens=cfg.prefix_reuse_min_tokens,
        )
        for i in range(cfg.num_engines)
    ]
    urls = ray.get([a.url.remote() for a in actors])
    return actors, urls
