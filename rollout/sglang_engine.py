"""SGLang rollout engines: server processes, the sglang-router, weight sync, health and restart.

Rollout code never sees this module: it talks to ``HttpEngineClient`` (``rollout/client.py``)
at the router's URL, exactly as it talks to the CPU engine. What lives here is the fleet's
lifecycle, driven by the driver (``rl/job.py``):

- ``EngineServer``: one SGLang server process (``python -m sglang.launch_server --model-path
  ... --tp-size N --host --port``; one per GPU group), started, probed (``GET /health``),
  restarted with the *current* weights (relaunch, then ``POST /update_weights_from_disk`` with
  the current ``weight_version``) and shut down (SIGTERM to its process group, SIGKILL after a
  grace period). Usable in-process or as a Ray actor (``EngineServerActor``) placed on its GPUs.
- ``Router``: the ``sglang-router`` binary (Rust, no CUDA) in front of the servers, ``POST
  /workers`` / ``DELETE /workers/{id}`` to swap a restarted server in and out.
- ``EngineFleet``: servers + router; ``supervise()`` restarts dead servers.
- Weight sync, SGLang's documented endpoints:
  * disaggregated (trainer and engines on different GPUs): ``POST /init_weights_update_group``
    once (``master_address``, ``master_port``, ``rank_offset``, ``world_size``, ``group_name``,
    ``backend``), then per bucket ``POST /update_weights_from_distributed`` (``names``,
    ``dtypes``, ``shapes``, ``group_name``, ``flush_cache``, ``weight_version``) while the
    trainer's rank 0 broadcasts the bucket's tensors in that order (``DistributedWeightSender``);
  * colocated (same GPUs): ``POST /update_weights_from_tensor`` with
    ``serialized_named_tensors`` (SGLang's ``MultiprocessingSerializer``: CUDA IPC handles, no
    copy; ``ColocatedTensorSender``);
  * anywhere: ``POST /update_weights_from_disk`` of an exported HF directory (the default).

SGLang itself is never installed on the CPU machine: the launch code runs against any server
that speaks the same API. The tests launch relayrl's CPU engine server
(``python -m relayrl.rollout.server``, which implements the health, disk and distributed
weight-update endpoints with gloo) through these same classes, behind the real router binary;
``update_weights_from_tensor`` and the NCCL path run only on GPUs (``tests/gpu/``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

SGLANG_LAUNCH = [sys.executable, "-m", "sglang.launch_server"]
"""The command prefix that starts one SGLang server."""
DEFAULT_GROUP = "relayrl_weight_sync"


# ----------------------------------------------------------------------------- commands (pure)


def server_command(launch: list[str], model_path: str, host: str, port: int, tp_size: int = 1,
                   extra_args: Iterable[str] = (), sglang: bool = True) -> list[str]:
    """The argv of one engine server.

    sglang: add SGLang's own flags (``--tp-size``; a CPU engine server takes only the common
    ``--model-path --host --port``).
    """
    cmd = [*launch, "--model-path", str(model_path), "--host", host, "--port", str(port)]
    if sglang:
        cmd += ["--tp-size", str(tp_size)]
    return cmd + [str(a) for a in extra_args]


def router_command(worker_urls: list[str], host: str, port: int, policy: str = "cache_aware",
                   extra_args: Iterable[str] = ()) -> list[str]:
    """The argv of the sglang-router in front of ``worker_urls`` (``sglang-router launch``)."""
    exe = shutil.which("sglang-router") or str(Path(sys.executable).with_name("sglang-router"))
    return [exe, "launch", "--host", host, "--port", str(port), "--policy", policy,
            "--worker-urls", *worker_urls, *[str(a) for a in extra_args]]


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes`` (a larger tensor is a
    bucket of its own). sizes: (name, bytes) pairs. Every name appears once, order kept."""
    buckets: list[list[str]] = []
    used = 0
    for name, n in sizes:
        if buckets and used + n <= bucket_bytes:
            buckets[-1].append(name)
            used += n
        else:
            buckets.append([name])
            used = n
    return buckets


# ----------------------------------------------------------------------------- HTTP (blocking)


class EngineLaunchError(RuntimeError):
    """A server or the router did not come up, or an engine endpoint answered with a failure."""


def http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> Any:
    """JSON reply of one HTTP call; EngineLaunchError with the server's message on failure."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as e:
        raise EngineLaunchError(f"{method} {url} returned HTTP {e.code}: {e.read().decode()[:500]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EngineLaunchError(f"{method} {url} failed: {e}") from None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text


def is_healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        http_json("GET", url + "/health", timeout=timeout)
        return True
    except EngineLaunchError:
        return False


def _require_success(out: Any, what: str, url: str) -> None:
    if not (isinstance(out, dict) and out.get("success")):
        raise EngineLaunchError(f"{url}: {what} failed: {out}")


# ----------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux), so a
    crashed driver or actor leaves no orphaned server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ManagedProcess:
    """A child process in its own session (so its workers die with it), output to ``log_path``."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()


def wait_until(ready, proc: ManagedProcess, timeout_s: float, what: str) -> None:
    """Poll ``ready()`` until true; EngineLaunchError (with the log tail) if ``proc`` exits or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise EngineLaunchError(f"{what} exited with code {proc.proc.returncode} before it was ready "
                                    f"(command: {' '.join(proc.cmd)}). Last output:\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.25)
    proc.stop(5)
    raise EngineLaunchError(f"{what} was not ready after {timeout_s:g} s. Last output:\n{proc.tail()}")


# ----------------------------------------------------------------------------- one server


@dataclass
class ServerSpec:
    """How to start one engine server.

    launch: command prefix (``SGLANG_LAUNCH``, or ``[python, -m, relayrl.rollout.server]``).
    sglang: whether ``launch`` is SGLang (adds ``--tp-size``; GPU ids from ``base_gpu_id``).
    extra_args: further server flags (e.g. ``--mem-fraction-static 0.7``).
    env: extra environment of the process.
    """

    model_path: str
    host: str = "127.0.0.1"
    port: int = 0
    tp_size: int = 1
    launch: list[str] = field(default_factory=lambda: list(SGLANG_LAUNCH))
    sglang: bool = True
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 900.0
    log_dir: str = "/tmp/relayrl-engines"


class EngineServer:
    """One engine server process: start, health, restart with the current weights, shutdown."""

    def __init__(self, spec: ServerSpec) -> None:
        from relayrl.rl.distributed import free_port

        self.spec = spec
        self.port = spec.port or free_port(spec.host if spec.host not in ("0.0.0.0", "") else "127.0.0.1")
        reach = "127.0.0.1" if spec.host in ("0.0.0.0", "") else spec.host
        if spec.host in ("0.0.0.0", ""):
            try:
                import ray

                reach = ray.util.get_node_ip_address() if ray.is_initialized() else reach
            except ImportError:
                pass
        self._url = f"http://{reach}:{self.port}"
        self.restarts = 0
        self.proc: ManagedProcess | None = None
        self._start(spec.model_path)

    def _start(self, model_path: str) -> None:
        s = self.spec
        cmd = server_command(s.launch, model_path, s.host, self.port, s.tp_size, s.extra_args, s.sglang)
        env = {**os.environ, **s.env}
        log_path = Path(s.log_dir) / f"engine-{self.port}-{self.restarts}.log"
        self.proc = ManagedProcess(cmd, log_path, env)
        wait_until(lambda: is_healthy(self._url, timeout=5), self.proc, s.startup_timeout_s,
                   f"engine server at {self._url}")

    def url(self) -> str:
        return self._url

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self, tries: int = 3) -> bool:
        """Process alive and ``GET /health`` answers (a busy server gets ``tries`` chances of 5 s,
        so that load alone never gets a healthy server restarted)."""
        if self.proc is None or not self.proc.alive():
            return False
        return any(is_healthy(self._url) for _ in range(tries))

    def restart(self, model_path: str | None = None, weight_version: int | None = None) -> str:
        """Kill (if needed) and relaunch on the same port from ``model_path`` (the latest exported
        weights; default the original checkpoint), then tag them ``weight_version``. Returns the URL."""
        if self.proc is not None:
            self.proc.stop(5)
        self.restarts += 1
        path = str(model_path or self.spec.model_path)
        self._start(path)
        if weight_version is not None:
            out = http_json("POST", self._url + "/update_weights_from_disk",
                            {"model_path": path, "weight_version": str(weight_version)}, timeout=self.spec.startup_timeout_s)
            _require_success(out, "tagging the restarted engine's weights", self._url)
        return self._url

    def kill(self) -> None:
        """SIGKILL the server at once (fault-injection in tests; the fleet notices and restarts)."""
        if self.proc is not None and self.proc.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.proc.wait(10)

    def shutdown(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class EngineServerActor(EngineServer):
    """``EngineServer`` under Ray (``ray.remote(EngineServerActor).options(num_gpus=...)``).

    Disaggregated: the actor holds its engine's ``tp`` GPUs, which Ray exposes to it (and to the
    SGLang child) as ``CUDA_VISIBLE_DEVICES``. Colocated: the actor holds a fraction of the first
    GPU of its group; SGLang is told where its group starts (``--base-gpu-id``) and sees the
    node's GPUs (see ``rl/placement.py``)."""

    def __init__(self, spec: ServerSpec, colocated: bool = False) -> None:
        if colocated and spec.sglang:
            import ray

            first = int(ray.get_gpu_ids()[0])
            spec.env = {**spec.env, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(first + spec.tp_size))}
            spec.extra_args = [*spec.extra_args, "--base-gpu-id", str(first)]
        super().__init__(spec)


# ----------------------------------------------------------------------------- the router


class Router:
    """The sglang-router process in front of ``worker_urls``."""

    def __init__(self, worker_urls: list[str], host: str = "127.0.0.1", port: int = 0, policy: str = "cache_aware",
                 extra_args: Iterable[str] = (), startup_timeout_s: float = 120.0,
                 log_dir: str = "/tmp/relayrl-engines") -> None:
        from relayrl.rl.distributed import free_port

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        # Its Prometheus exporter binds a fixed port (29000) by default: give it a free one, so
        # two routers (two jobs) on one host do not collide.
        extra = ["--prometheus-port", str(free_port(host)), "--prometheus-host", host, *extra_args]
        cmd = router_command(worker_urls, host, self.port, policy, extra)
        self.proc = ManagedProcess(cmd, Path(log_dir) / f"router-{self.port}.log")
        wait_until(lambda: self._serving(len(worker_urls)), self.proc, startup_timeout_s, f"sglang-router at {self.url}")

    def workers(self) -> list[dict[str, Any]]:
        out = http_json("GET", self.url + "/workers", timeout=10)
        return list(out.get("workers", [])) if isinstance(out, dict) else []

    def _serving(self, n: int) -> bool:
        try:
            return is_healthy(self.url, 2) and sum(bool(w.get("is_healthy")) for w in self.workers()) >= n
        except EngineLaunchError:
            return False

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None:
        http_json("POST", self.url + "/workers", {"url": url}, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(w.get("url") == url and w.get("is_healthy") for w in self.workers()):
                return
            time.sleep(0.25)
        raise EngineLaunchError(f"sglang-router at {self.url} did not take worker {url} within {timeout_s:g} s")

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None:
        for w in self.workers():
            if w.get("url") == url:
                http_json("DELETE", f"{self.url}/workers/{w['id']}", timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(w.get("url") == url for w in self.workers()):
            time.sleep(0.25)

    def shutdown(self) -> None:
        self.proc.stop(10)


# ----------------------------------------------------------------------------- the fleet


class EngineFleet:
    """Engine servers (local objects or Ray actor handles of ``EngineServer``) and an optional router.

    ``urls`` is what rollout workers talk to (the router, or every server); ``update_urls`` the
    servers themselves (weight updates and health go to each). ``supervise`` restarts dead
    servers with the current weights and swaps them back into the router.
    """

    def __init__(self, servers: list[Any], router_cfg: dict[str, Any] | None = None, respawn: Any = None,
                 engine_tp: list[int] | None = None) -> None:
        self.servers = servers
        self.server_urls = [self._call(s, "url") for s in servers]
        self.router = Router(self.server_urls, **router_cfg) if router_cfg is not None else None
        self.restarts = 0
        self.respawn = respawn
        """``respawn(i, model_path, weight_version) -> server`` replaces a server whose Ray actor
        died (it cannot be asked to restart itself); None: servers restart themselves."""
        self.engine_tp = engine_tp or [1] * len(servers)
        """GPUs (ranks of a weight-sync group) per server."""

    @staticmethod
    def _call(server: Any, method: str, *args: Any) -> Any:
        fn = getattr(server, method)
        if hasattr(fn, "remote"):  # a Ray actor handle
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)

    @property
    def urls(self) -> list[str]:
        return [self.router.url] if self.router is not None else list(self.server_urls)

    @property
    def update_urls(self) -> list[str]:
        return list(self.server_urls)

    def dead(self) -> list[int]:
        """Indices of servers whose process died or whose /health does not answer."""
        out = []
        for i, s in enumerate(self.servers):
            try:
                ok = self._call(s, "health")
            except Exception:  # noqa: BLE001 - a dead Ray actor counts as a dead server
                ok = False
            if not ok:
                out.append(i)
        return out

    def supervise(self, model_path: str | None, weight_version: int | None) -> list[int]:
        """Restart every dead server from ``model_path`` (the current weights) tagged
        ``weight_version``; returns the indices restarted."""
        dead = self.dead()
        for i in dead:
            url = self.server_urls[i]
            log.warning("engine server %s is down; restarting it with weight version %s", url, weight_version)
            if self.router is not None:
                self.router.remove_worker(url)
            if self.respawn is not None and (not hasattr(self.servers[i], "restart")
                                             or not self._actor_alive(self.servers[i])):
                self._discard(self.servers[i])
                self.servers[i] = self.respawn(i, model_path, weight_version)
                self.server_urls[i] = self._call(self.servers[i], "url")
            else:
                self.server_urls[i] = self._call(self.servers[i], "restart", model_path, weight_version)
            if self.router is not None:
                self.router.add_worker(self.server_urls[i])
            self.restarts += 1
        return dead

    @staticmethod
    def _discard(server: Any) -> None:
        """Kill a Ray actor whose server is down (its port is then free for the replacement)."""
        if hasattr(getattr(server, "url", None), "remote"):
            import ray

            try:
                ray.kill(server)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def release_memory(self) -> None:
        """Colocated engines hand their GPU memory (weights and KV cache) to the trainer:
        SGLang's ``/release_memory_occupation`` (servers started with ``--enable-memory-saver``)."""
        for url in self.server_urls:
            _require_success(http_json("POST", url + "/release_memory_occupation", {}, timeout=600),
                             "release_memory_occupation", url)

    def resume_memory(self) -> None:
        """Take it back before the weight sync (``/resume_memory_occupation``)."""
        for url in self.server_urls:
            _require_success(http_json("POST", url + "/resume_memory_occupation", {}, timeout=600),
                             "resume_memory_occupation", url)

    def _actor_alive(self, server: Any) -> bool:
        try:
            self._call(server, "url")
            return True
        except Exception:  # noqa: BLE001 - RayActorError and friends
            return False

    def shutdown(self) -> None:
        if self.router is not None:
            self.router.shutdown()
        for s in self.servers:
            try:
                self._call(s, "shutdown")
            except Exception:  # noqa: BLE001 - shutting down what is already gone
                pass


def launch_engines(cfg: Any, model_path: str, log_dir: str, placement: Any = None, seed: int = 0) -> EngineFleet | None:
    """The engine fleet of a job (``cfg``: the whole ``Config``), or None for ``engine.kind: external``.

    ``cpu``: relayrl's CPU engine servers as Ray actors (``rollout.engine_actor``), respawned on
    their old port when one dies. ``sglang``: one ``EngineServerActor`` per engine, each holding
    its GPU bundle of ``placement`` (a ``(PlacementPlan, placement group)`` pair) and running one
    SGLang server. ``engine.router`` puts the sglang-router in front of either.
    """
    import ray

    e = cfg.engine
    router_cfg = {"host": "127.0.0.1" if e.host in ("127.0.0.1", "localhost") else e.host,
                  "policy": e.sglang.router_policy, "log_dir": log_dir} if e.router else None
    if e.kind == "external":
        return None
    if e.kind == "cpu":
        from urllib.parse import urlparse

        from relayrl.rollout.engine_actor import EngineServerActor as CpuEngineServerActor

        threads = e.num_threads or os.cpu_count()
        actor_cls = ray.remote(num_cpus=0)(CpuEngineServerActor)

        def spawn(i: int, path: str | None = None, version: int | None = None, port: int = 0) -> Any:
            actor = actor_cls.remote(str(path or model_path), max_batch_size=e.max_batch_size, max_seq_len=e.max_seq_len,
                                     num_threads=threads, host=e.host, port=port, seed=seed + i,
                                     prefix_reuse_min_tokens=e.prefix_reuse_min_tokens)
            if version is not None:  # tag the reloaded weights with the version they are
                ray.get(actor.update_weights.remote(str(path or model_path), int(version)))
            return actor

        servers = [spawn(i) for i in range(e.num_engines)]
        fleet = EngineFleet(servers, router_cfg)
        fleet.respawn = lambda i, path, version: spawn(i, path, version, port=urlparse(fleet.server_urls[i]).port)
        return fleet

    from relayrl.rl.placement import strategy

    plan, pg = placement
    launch = [sys.executable if a == "python" else a for a in e.sglang.launch_command]

    def spawn_sglang(i: int, path: str | None = None, version: int | None = None) -> Any:
        extra = list(e.sglang.extra_args)
        if plan.mode == "colocated" and "--enable-memory-saver" not in extra:
            extra.append("--enable-memory-saver")  # so that it can release its memory while the trainer runs
        env: dict[str, str] = {}
        opts: dict[str, Any] = {"num_gpus": plan.engine_gpus, "num_cpus": 0}
        if pg is not None:
            opts["scheduling_strategy"] = strategy(pg, plan.engine_bundle[i])
        spec = ServerSpec(model_path=str(path or model_path), host=e.host, tp_size=e.sglang.tp_size, launch=launch,
                          extra_args=extra, env=env, startup_timeout_s=e.sglang.startup_timeout_s, log_dir=log_dir)
        actor = ray.remote(EngineServerActor).options(**opts).remote(spec, plan.mode == "colocated")
        if version is not None:
            ray.get(actor.restart.remote(str(path or model_path), int(version)))
        return actor

    servers = [spawn_sglang(i) for i in range(e.num_engines)]
    return EngineFleet(servers, router_cfg, respawn=spawn_sglang, engine_tp=[e.sglang.tp_size] * e.num_engines)


# ----------------------------------------------------------------------------- weight sync


def init_weight_update_group(backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, timeout_s: float = 600.0):
    """A process group of the trainer's rank 0 (rank 0) and every engine GPU (ranks 1..), made
    apart from the default group, the way SGLang's server makes its side of it: a TCP
    rendezvous at ``master_address:master_port`` whose store is prefixed with ``group_name``.
    Both sides must call it with the same arguments but their own ``rank``."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(pg)
    except (ValueError, RuntimeError, AssertionError):
        pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DistributedWeightSender:
    """Trainer rank 0's side of ``update_weights_from_distributed`` (disaggregated engines).

    engine_urls: the servers (not the router); engine_tp: GPUs per server (each is one rank of
    the group, in order after the trainer's rank 0).
    backend: ``nccl`` on GPUs; ``gloo`` for CPU engine servers.
    """

    def __init__(self, engine_urls: list[str], engine_tp: list[int], master_address: str, master_port: int,
                 backend: str = "nccl", group_name: str = DEFAULT_GROUP, timeout_s: float = 600.0,
                 device: torch.device | str = "cpu") -> None:
        if len(engine_urls) != len(engine_tp):
            raise ValueError("engine_urls and engine_tp must have one entry per engine server")
        self.urls = list(engine_urls)
        self.group_name, self.backend, self.timeout_s = group_name, backend, timeout_s
        self.broken = False
        self.device = torch.device(device)
        world = 1 + sum(engine_tp)
        offsets = [1 + sum(engine_tp[:i]) for i in range(len(engine_tp))]
        bodies = [{"master_address": master_address, "master_port": master_port, "rank_offset": off,
                   "world_size": world, "group_name": group_name, "backend": backend} for off in offsets]
        results = self._concurrently("/init_weights_update_group", bodies,
                                     lambda: init_weight_update_group(backend, master_address, master_port, 0, world,
                                                                      group_name, timeout_s))
        self.pg = results

    def _concurrently(self, path: str, bodies: list[dict[str, Any]], local):
        """POST ``bodies`` to every engine while running ``local()`` (this side of the collective),
        all in threads; return ``local()``'s result, or raise the first failure at once.

        An engine that dies mid-sync fails its POST while ``local()`` is still blocked in the
        collective waiting for it: the sender is then ``broken`` (its group is abandoned, the
        blocked thread ends at the group's timeout) and must be replaced."""
        errors: list[BaseException] = []
        result: list[Any] = []
        done = threading.Event()
        pending = [len(self.urls) + 1]
        lock = threading.Lock()

        def finish(err: BaseException | None = None) -> None:
            with lock:
                if err is not None:
                    errors.append(err)
                pending[0] -= 1
                if err is not None or pending[0] == 0:
                    done.set()

        def post(i: int) -> None:
            try:
                out = http_json("POST", self.urls[i] + path, bodies[i], timeout=self.timeout_s)
                _require_success(out, path, self.urls[i])
                finish()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                finish(e)

        def run_local() -> None:
            try:
                result.append(local())
                finish()
            except BaseException as e:  # noqa: BLE001
                finish(e)

        for target, args in [(run_local, ())] + [(post, (i,)) for i in range(len(self.urls))]:
            threading.Thread(target=target, args=args, daemon=True).start()
        if not done.wait(self.timeout_s):
            errors.append(EngineLaunchError(f"{path} did not finish within {self.timeout_s:g} s"))
        if errors:
            self.broken = True
            raise errors[0]
        return result[0] if result else None

    def send(self, state: dict[str, torch.Tensor], version: int, bucket_bytes: int = 512 * 2**20) -> dict[str, float]:
        """Broadcast ``state`` (HF names) to every engine in buckets, tagged ``version``.

        Returns ``{"bytes", "buckets", "seconds"}``. The engines' caches are flushed after the last bucket."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        names = list(state)
        sizes = [(n, state[n].numel() * state[n].element_size()) for n in names]
        buckets = plan_buckets(sizes, bucket_bytes)
        for b, bucket in enumerate(buckets):
            tensors = [state[n].to(self.device).contiguous() for n in bucket]
            body = {"names": bucket, "dtypes": [_dtype_name(t.dtype) for t in tensors],
                    "shapes": [list(t.shape) for t in tensors], "group_name": self.group_name,
                    "flush_cache": b == len(buckets) - 1, "weight_version": str(version)}

            def broadcast(tensors=tensors) -> None:
                for t in tensors:
                    dist.broadcast(t, src=0, group=self.pg)

            self._concurrently("/update_weights_from_distributed", [body] * len(self.urls), broadcast)
        return {"bytes": float(sum(n for _, n in sizes)), "buckets": float(len(buckets)),
                "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        for url in self.urls:
            try:
                http_json("POST", url + "/destroy_weights_update_group", {"group_name": self.group_name}, timeout=30)
            except EngineLaunchError:
                pass
        if not self.broken and getattr(self, "pg", None) is not None:
            destroy_weight_update_group(self.pg)  # a broken group may still have a thread blocked in it


class ColocatedTensorSender:
    """``update_weights_from_tensor`` for engines on the trainer's own GPUs (GPU only).

    The tensors are passed as CUDA IPC handles with SGLang's ``MultiprocessingSerializer``; each
    of an engine's TP ranks gets the same full tensors and loads its shard. Needs ``sglang`` in
    the trainer's environment (the serializer's wire format is SGLang's own).
    """

    def __init__(self, engine_urls: list[str], engine_tp: list[int], timeout_s: float = 600.0) -> None:
        self.urls, self.engine_tp, self.timeout_s = list(engine_urls), list(engine_tp), timeout_s

    def send(self, state: dict[str, torch.Tensor], version: int, bucket_bytes: int = 512 * 2**20) -> dict[str, float]:
        from sglang.srt.utils import MultiprocessingSerializer  # GPU clusters only; see the class doc

        t0 = time.perf_counter()
        names = list(state)
        buckets = plan_buckets([(n, state[n].numel() * state[n].element_size()) for n in names], bucket_bytes)
        for b, bucket in enumerate(buckets):
            named = [(n, state[n].cuda().contiguous()) for n in bucket]
            blob = MultiprocessingSerializer.serialize(named, output_str=True)
            for url, tp in zip(self.urls, self.engine_tp, strict=True):
                out = http_json("POST", url + "/update_weights_from_tensor",
                                {"serialized_named_tensors": [blob] * tp, "flush_cache": b == len(buckets) - 1,
                                 "weight_version": str(version)}, timeout=self.timeout_s)
                _require_success(out, "update_weights_from_tensor", url)
        return {"bytes": float(sum(state[n].numel() * state[n].element_size() for n in names)),
                "buckets": float(len(buckets)), "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        pass
