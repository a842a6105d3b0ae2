"""Ray wrappers of the trainer: one actor per data-parallel rank, and the driver-side group.

``TrainerActor`` holds one backend rank (``DeepSpeedBackend`` or ``MegatronBackend``, by
``trainer.backend``) in its own process. ``TrainerGroup`` (a
plain class used by the driver) starts ``world_size`` of them, points them at one rendezvous
address, splits each batch across them and puts the results back together, and itself
implements ``rl.backend.TrainerBackend``, so the driver cannot tell one rank from many.

Data-parallel contract
----------------------
- Samples are split by ``shard_by_tokens``: balanced by token count, deterministic (the same
  batch always gives the same shards), every sample on exactly one data-parallel shard. The
  tensor-parallel peers of a Megatron replica all get their replica's shard; only the first of
  them reports outputs and metrics.
- ``loss_fn`` is the same closure on every rank (cloudpickled by Ray) and must already be
  normalised for the *whole* batch (e.g. divided by the batch's total action tokens computed
  on the driver before sharding): ranks' gradients are summed, not averaged.
- ``train_step`` metrics are the ranks' sums added together; ``grad_norm`` and ``lr`` are
  global already and come from rank 0.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from relayrl.config import OptimConfig, TrainerConfig
from relayrl.rl.backend import LossFn, Role, Sample

log = logging.getLogger(__name__)

_GLOBAL_METRICS = ("grad_norm", "lr")
_RENDEZVOUS_ATTEMPTS = 3


def _get_all(refs: list) -> list:
    """``ray.get`` of all ``refs``, raising the first failure at once: the other ranks may be
    blocked in a collective waiting for the failed one, and would never finish."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def shard_by_tokens(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split sample indices over ``world_size`` ranks with near-equal token counts.

    Longest-processing-time greedy: samples longest first (ties by index) each go to the rank
    with the fewest tokens so far (ties to the lowest rank). Each shard lists its indices in
    increasing order. Deterministic for given lengths.
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += lengths[i]
    return [sorted(s) for s in shards]


def make_backend(role: Role, model_path: str, trainer_cfg: TrainerConfig, optim_cfg: OptimConfig | None,
                 dtype: str, rank: int, world_size: int, seed: int):
    """The ``TrainerBackend`` that ``trainer.backend`` names, for one rank."""
    if trainer_cfg.backend == "megatron":
        from relayrl.rl.megatron_backend import MegatronBackend as cls
    else:
        from relayrl.rl.deepspeed_backend import DeepSpeedBackend as cls
    return cls(role, model_path, trainer_cfg, optim_cfg, dtype, rank, world_size, seed)


def data_parallel_ranks(world_size: int, trainer_cfg: TrainerConfig) -> list[int]:
    """Per global rank, the data shard it trains on. DeepSpeed ranks each get one. Megatron: the
    tensor-parallel ranks, context-parallel ranks and pipeline stages of one model replica share
    its shard; in megatron-core's rank order (TP fastest, then CP, then data parallel, the stage
    slowest) rank ``r`` is in replica ``(r // (tp cp)) % dp`` (``rl.distributed.replica_of``)."""
    from relayrl.rl.distributed import replica_of

    if trainer_cfg.backend != "megatron":
        return list(range(world_size))
    m = trainer_cfg.megatron
    return [replica_of(r, world_size, m.tensor_parallel_size, m.pipeline_parallel_size, m.context_parallel_size)
            for r in range(world_size)]


@ray.remote
class TrainerActor:
    """One data-parallel rank: a ``DeepSpeedBackend`` in its own process."""

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.backend = None
        self.rank = 0

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to serve the process group on."""
        from relayrl.rl.distributed import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def init_backend(
        self,
        role: Role,
        model_path: str,
        trainer_cfg: TrainerConfig,
        optim_cfg: OptimConfig | None,
        dtype: str,
        rank: int,
        world_size: int,
        seed: int,
        master_addr: str,
        master_port: int,
    ) -> None:
        # Ray gives each actor its own GPU (CUDA_VISIBLE_DEVICES), so the local device is 0.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0"
        )
        self.rank = rank
        self.backend = make_backend(role, model_path, trainer_cfg, optim_cfg, dtype, rank, world_size, seed)

    def forward_logprobs(self, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        return self.backend.forward_logprobs(samples, temperature)

    def forward_values(self, samples: list[Sample]) -> list[torch.Tensor]:
        return self.backend.forward_values(samples)

    def train_step(self, samples: list[Sample], loss_fn: LossFn, temperature: float) -> dict[str, float]:
        return self.backend.train_step(samples, loss_fn, temperature)

    def state_dict_for_engine(self) -> dict[str, torch.Tensor] | None:
        # Every rank takes part (ZeRO-3 gathers); only rank 0 ships the weights back.
        state = self.backend.state_dict_for_engine(on_this_rank=self.rank == 0)
        return state if self.rank == 0 else None

    def export_hf(self, path: str, durable: bool = True) -> None:
        self.backend.export_hf(path, durable)

    def sync_weights_distributed(self, engine_urls: list[str], engine_tp: list[int], backend: str,
                                 version: int, bucket_bytes: int, timeout_s: float) -> dict[str, float] | None:
        """Every rank gathers (ZeRO-3 / TP); rank 0 broadcasts the full weights to the engines
        (``rollout.sglang_engine.DistributedWeightSender``; the group is made on first use)."""
        from relayrl.rl import distributed
        from relayrl.rollout.sglang_engine import DistributedWeightSender

        state = self.backend.state_dict_for_engine(on_this_rank=self.rank == 0)
        if self.rank != 0:
            return None
        if getattr(self, "_sender", None) is not None and self._sender.broken:
            self._sender = None  # an engine died mid-sync: its group is abandoned, a new one is made
        if getattr(self, "_sender", None) is None:
            ip = ray.util.get_node_ip_address()
            self._sender_count = getattr(self, "_sender_count", 0) + 1
            self._sender = DistributedWeightSender(engine_urls, engine_tp, ip, distributed.free_port(ip), backend,
                                                   group_name=f"relayrl_weights_{self._sender_count}",
                                                   timeout_s=timeout_s, device=distributed.device())
        return self._sender.send(state, version, bucket_bytes)

    def sync_weights_tensor(self, engine_urls: list[str], engine_tp: list[int], version: int, bucket_bytes: int,
                            timeout_s: float) -> dict[str, float] | None:
        """Colocated engines: rank 0 hands them CUDA IPC handles of the full weights (GPU only)."""
        from relayrl.rollout.sglang_engine import ColocatedTensorSender

        state = self.backend.state_dict_for_engine(on_this_rank=self.rank == 0)
        if self.rank != 0:
            return None
        return ColocatedTensorSender(engine_urls, engine_tp, timeout_s).send(state, version, bucket_bytes)

    def reset_weight_sender(self) -> None:
        """Leave the weight-sync group (an engine was restarted; the next sync makes a new one)."""
        sender = getattr(self, "_sender", None)
        if sender is not None:
            sender.close()
            self._sender = None

    def save(self, path: str) -> None:
        self.backend.save(path)

    def load(self, path: str) -> None:
        self.backend.load(path)

    def global_step(self) -> int:
        return self.backend.global_step


class TrainerGroup:
    """``world_size`` ``TrainerActor`` ranks of one model, driven as one ``TrainerBackend``.

    Args:
        role, model_path, trainer_cfg, optim_cfg, dtype, seed: as for ``DeepSpeedBackend``.
        world_size: ranks; default ``trainer_cfg.world_size``.
        num_cpus_per_rank, num_gpus_per_rank: Ray resources of each actor.
        num_threads: torch threads of each actor; default ``num_cpus_per_rank``.
        scheduling: per rank, a Ray scheduling strategy (its bundle of the job's placement group,
            see ``rl.placement``); None = anywhere.

    Ray must be initialised (``ray.init``) by the caller.
    """

    def __init__(
        self,
        role: Role,
        model_path: str,
        trainer_cfg: TrainerConfig,
        optim_cfg: OptimConfig | None = None,
        dtype: str = "float32",
        seed: int = 0,
        world_size: int | None = None,
        num_cpus_per_rank: float = 1,
        num_gpus_per_rank: float = 0,
        num_threads: int | None = None,
        scheduling: list[Any] | None = None,
    ) -> None:
        self.role: Role = role
        self.world_size = world_size or trainer_cfg.world_size
        self.dp_ranks = data_parallel_ranks(self.world_size, trainer_cfg)
        threads = num_threads or max(1, int(num_cpus_per_rank))
        self.actors = [
            TrainerActor.options(num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                                 **({"scheduling_strategy": scheduling[r]} if scheduling else {})).remote(threads)
            for r in range(self.world_size)
        ]
        for attempt in range(_RENDEZVOUS_ATTEMPTS):
            # The port was free when rank 0 looked; another process can take it before the
            # process group binds it (seen: EADDRINUSE under a busy test suite). Then a new one.
            addr, port = ray.get(self.actors[0].rendezvous_address.remote())
            try:
                _get_all(
                    [
                        actor.init_backend.remote(
                            role, str(model_path), trainer_cfg, optim_cfg, dtype, rank, self.world_size, seed, addr, port
                        )
                        for rank, actor in enumerate(self.actors)
                    ]
                )
                break
            except ray.exceptions.RayTaskError as e:
                # One rank only: with more, the others would still be waiting on the old port.
                if attempt == _RENDEZVOUS_ATTEMPTS - 1 or self.world_size > 1 or "EADDRINUSE" not in str(e):
                    raise
                log.warning("trainer rendezvous port %d was taken meanwhile; trying another", port)

    def _shards(self, samples: list[Sample]) -> list[list[int]]:
        """Per global rank, the indices of its samples (TP peers get the same shard)."""
        per_dp = shard_by_tokens([int(s["tokens"].shape[0]) for s in samples], max(self.dp_ranks) + 1)
        return [per_dp[d] for d in self.dp_ranks]

    def _reporting(self) -> list[bool]:
        """Whether a rank's results count: the first rank of each data shard (with megatron, TP
        rank 0 of the first pipeline stage; every rank of a replica returns the same results)."""
        return [self.dp_ranks.index(shard) == r for r, shard in enumerate(self.dp_ranks)]

    def _gather_per_sample(self, samples: list[Sample], method: str, *args: Any) -> list[torch.Tensor]:
        shards = self._shards(samples)
        refs = [
            getattr(actor, method).remote([samples[i] for i in shard], *args) for actor, shard in zip(self.actors, shards, strict=True)
        ]
        out: list[torch.Tensor | None] = [None] * len(samples)
        for shard, results, counts in zip(shards, _get_all(refs), self._reporting(), strict=True):
            if not counts:
                continue
            for i, r in zip(shard, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def forward_logprobs(self, samples: list[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
        return self._gather_per_sample(samples, "forward_logprobs", temperature)

    def forward_values(self, samples: list[Sample]) -> list[torch.Tensor]:
        return self._gather_per_sample(samples, "forward_values")

    def train_step(self, samples: list[Sample], loss_fn: LossFn, temperature: float = 1.0) -> dict[str, float]:
        shards = self._shards(samples)
        fn_ref = ray.put(loss_fn)
        per_rank = _get_all(
            [
                actor.train_step.remote([samples[i] for i in shard], fn_ref, temperature)
                for actor, shard in zip(self.actors, shards, strict=True)
            ]
        )
        merged: dict[str, float] = {}
        for metrics, counts in zip(per_rank, self._reporting(), strict=True):
            if not counts:
                continue
            for k, v in metrics.items():
                if k not in _GLOBAL_METRICS:
                    merged[k] = merged.get(k, 0.0) + v
        for k in _GLOBAL_METRICS:
            merged[k] = per_rank[0][k]
        return merged

    def state_dict_for_engine(self) -> dict[str, torch.Tensor]:
        return _get_all([a.state_dict_for_engine.remote() for a in self.actors])[0]

    def export_hf(self, path: str, durable: bool = True) -> None:
        _get_all([a.export_hf.remote(str(path), durable) for a in self.actors])

    def sync_weights_distributed(self, engine_urls: list[str], engine_tp: list[int], backend: str, version: int,
                                 bucket_bytes: int, timeout_s: float = 600.0) -> dict[str, float]:
        """Broadcast the current weights from rank 0 to ``engine_urls``; rank 0's stats."""
        return _get_all([a.sync_weights_distributed.remote(engine_urls, engine_tp, backend, version, bucket_bytes,
                                                            timeout_s) for a in self.actors])[0]

    def sync_weights_tensor(self, engine_urls: list[str], engine_tp: list[int], version: int, bucket_bytes: int,
                            timeout_s: float = 600.0) -> dict[str, float]:
        return _get_all([a.sync_weights_tensor.remote(engine_urls, engine_tp, version, bucket_bytes, timeout_s)
                         for a in self.actors])[0]

    def reset_weight_sender(self) -> None:
        _get_all([a.reset_weight_sender.remote() for a in self.actors[:1]])

    def save(self, path: str) -> None:
        _get_all([a.save.remote(str(path)) for a in self.actors])

    def load(self, path: str) -> None:
        _get_all([a.load.remote(str(path)) for a in self.actors])

    @property
    def global_step(self) -> int:
        return ray.get(self.actors[0].global_step.remote())

    def shutdown(self) -> None:
        """Kill the actors (their process group goes with them)."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
