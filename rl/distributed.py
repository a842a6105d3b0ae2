"""The one process group of a trainer process, and small collectives the backends need.

A trainer process holds one data-parallel rank. The policy, critic and reference backends of
that process share one ``torch.distributed`` default group, initialised once here (gloo on CPU,
NCCL when CUDA is available), whoever asks first. ``MASTER_ADDR``/``MASTER_PORT`` come from the
environment (``rl.trainer_actor`` sets them); a single-rank process without them gets
127.0.0.1 and a free port.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

import torch
import torch.distributed as dist


def replica_of(rank: int, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> int:
    """The data-parallel replica (data shard) of global ``rank`` in megatron-core's rank order
    (``tp-cp-ep-dp-pp``: TP fastest, then CP, then DP, the pipeline stage slowest):
    ``(rank // (tp cp)) % dp`` with ``dp = world_size / (tp cp pp)``. All TP ranks, CP ranks and
    stages of a replica see its samples; with all sizes 1, every rank is its own replica."""
    return (rank // (tp * cp)) % (world_size // (tp * cp * pp))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; racy but fine locally)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _quiet_deepspeed() -> None:
    import deepspeed.utils

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls the c10d collectives that torch 2.13 renamed; the warning is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def init_distributed(rank: int, world_size: int) -> None:
    """Join (or, in this process, create) the trainer's process group; idempotent.

    Raises ValueError if the group already exists with another rank or size: two backends in
    one process must be the same data-parallel rank.
    """
    import deepspeed

    _quiet_deepspeed()
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise ValueError(
                f"this process already joined a process group as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}; a backend asked for rank {rank} of {world_size}. All "
                "backends of one process must use the same rank and world_size."
            )
        return
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError(
            f"world_size={world_size} needs MASTER_ADDR and MASTER_PORT in the environment "
            "(rl.trainer_actor.TrainerGroup sets them for its actors)."
        )
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.setdefault("LOCAL_RANK", "0" if world_size == 1 else str(rank))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel here (30-45 s
        # on two cores whenever its build flags differ from the cached build's) that only its
        # inference all-reduce uses; trainers reduce over gloo. Marked unavailable, it is skipped.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=world_size, auto_mpi_discovery=False, verbose=False)


def device() -> torch.device:
    """The device of this rank's trainer: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all ranks (used to give every rank the same micro-batch count)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

