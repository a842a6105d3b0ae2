"""A TP rank for the tensor-parallel test: run in a spawned process (gloo), write its results.

``run_rank(rank, world_size, port, model_dir, out_dir, samples, tp)`` builds a Megatron policy
with ``tensor_parallel_size=tp`` (the rest of ``world_size`` data parallel), gives each rank its
replica's shard of ``samples`` as ``TrainerGroup`` would, computes log-probabilities, takes one
optimizer step with a token-mean NLL loss normalised for the whole batch, and has global rank 0
write every rank's ``{"index", "logprobs", "metrics", "reports"}`` and the gathered HF weights
to ``out_dir/result.pt``.
"""

from __future__ import annotations

import os

import torch


def nll_loss_fn(n_tokens: int):
    def loss_fn(outputs, mb):
        mask = mb["loss_mask"].to(outputs["logprobs"].dtype)
        loss = -(outputs["logprobs"] * mask).sum() / n_tokens
        return loss, {"nll": float(loss.detach())}

    return loss_fn


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str, samples, tp: int) -> None:
    from support.megatron_cpu import install

    install()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    from relayrl.config import OptimConfig, TrainerConfig
    from relayrl.rl.megatron_backend import MegatronBackend

    tc = TrainerConfig(backend="megatron", world_size=world_size, micro_batch_size=2,
                       megatron={"tensor_parallel_size": tp})
    backend = MegatronBackend("policy", model_dir, tc, OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None),
                              rank=rank, world_size=world_size)
    import torch.distributed as dist

    from relayrl.rl.trainer_actor import data_parallel_ranks, shard_by_tokens

    # As TrainerGroup does: one shard per data-parallel replica, TP peers share it.
    dp_ranks = data_parallel_ranks(world_size, tc)
    shards = shard_by_tokens([int(s["tokens"].shape[0]) for s in samples], dp_ranks[-1] + 1)
    mine = [samples[i] for i in shards[dp_ranks[rank]]]
    logprobs = backend.forward_logprobs(mine)
    n_tokens = sum(int(s["loss_mask"].sum()) for s in samples)  # normalised for the whole batch
    metrics = backend.train_step(mine, nll_loss_fn(n_tokens))
    weights = backend.state_dict_for_engine()
    everyone = [None] * world_size
    dist.all_gather_object(everyone, {"index": shards[dp_ranks[rank]], "logprobs": logprobs, "metrics": metrics,
                                      "reports": backend.reports})
    if rank == 0:
        torch.save({"ranks": everyone, "weights": weights}, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_pipeline_rank(rank: int, world_size: int, port: int, out_dir: str, jobs: list[dict]) -> None:
    """A rank of the pipeline-parallel test: ``trainer.megatron.pipeline_parallel_size=world_size``.

    Each job is ``{"role", "model_dir", "samples", "loss_fn", "name"}`` (``loss_fn`` a picklable
    factory, e.g. a ``functools.partial`` of ``rl.ppo.make_policy_loss_fn``). Per job this rank
    builds the backend, computes its per-token outputs (log-probabilities or values), takes one
    step, saves, takes a second step; then a fresh backend loads the checkpoint and takes the
    second step again; last, each stage is handed a different shard (``mismatch``: the error).
    Global rank 0 writes, per job, every rank's results and the gathered HF
    weights after each step to ``out_dir/pipeline.pt``.
    """
    from support.megatron_cpu import install

    install()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from relayrl.config import OptimConfig, TrainerConfig
    from relayrl.rl.megatron_backend import MegatronBackend, replica_of

    tc = TrainerConfig(backend="megatron", world_size=world_size, micro_batch_size=2,
                       megatron={"pipeline_parallel_size": world_size})
    optim = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None, warmup_steps=3)
    out = {}
    for job in jobs:
        def build():
            return MegatronBackend(job["role"], job["model_dir"], tc, optim, rank=rank, world_size=world_size)

        backend = build()
        forward = backend.forward_values if job["role"] == "critic" else backend.forward_logprobs
        mine: dict = {"outputs": forward(job["samples"]), "reports": backend.reports,
                      "replica": (replica_of(rank, world_size, 1, world_size), ps.get_data_parallel_rank()),
                      "stage": backend.pp_rank, "layers": len(backend.model.decoder.layers)}
        mine["step1"] = backend.train_step(job["samples"], job["loss_fn"]())
        w1 = backend.state_dict_for_engine()
        ckpt = os.path.join(out_dir, f"ckpt_{job['name']}")
        backend.save(ckpt)
        mine["step2"] = backend.train_step(job["samples"], job["loss_fn"]())
        w2 = backend.state_dict_for_engine()
        backend.export_hf(os.path.join(out_dir, f"hf_{job['name']}"))
        resumed = build()
        resumed.load(ckpt)
        mine["step2_resumed"] = resumed.train_step(job["samples"], job["loss_fn"]())
        w2_resumed = resumed.state_dict_for_engine()
        try:  # the stages handed different shards (as a driver unaware of PP would): refused
            forward(job["samples"][rank:])
            mine["mismatch"] = None
        except ValueError as e:
            mine["mismatch"] = str(e)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        out[job["name"]] = {"ranks": everyone, "weights1": w1, "weights2": w2, "weights2_resumed": w2_resumed}
        backend.close()
        resumed.close()
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "pipeline.pt"))
    dist.barrier()
    dist.destroy_process_group()
