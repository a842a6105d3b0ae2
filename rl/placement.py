"""Where trainer ranks and SGLang engines run: Ray placement groups for the two GPU layouts.

``ray.placement`` chooses:

disaggregated (default)
    Trainer ranks and engines on disjoint GPUs. Bundles: one ``{GPU: 1}`` per trainer rank, then
    one ``{GPU: tp}`` per engine (``engine.sglang.tp_size``; an engine's GPUs are one bundle, so
    they are on one node). The policy, critic and reference actors of rank r share bundle r
    (each holds ``1 / roles`` of its GPU; they take turns). Rollouts keep running while the
    trainer trains (``rollout.max_weight_lag > 0``); weights go by NCCL broadcast
    (``engine.weight_sync: distributed``) or through disk.

colocated
    Engines on the trainer's own GPUs. Bundles: one ``{GPU: 1}`` per GPU; trainer rank r on
    bundle r; engine e's actor on bundle ``e * tp`` (the first GPU of its group). Every actor
    holds ``1 / (roles + 1)`` of its GPU. SGLang is started with ``--base-gpu-id`` = that
    GPU and sees the node's GPUs, so its group must be ``tp`` consecutive GPUs of one node:
    ``tp`` must divide ``ray.gpus_per_node`` (checked) and the bundles are packed node by node
    (``STRICT_PACK`` within a node-sized group is Ray's to honour; on a shared cluster reserve
    whole nodes). Generation and training alternate (on-policy, ``rollout.max_weight_lag: 0``);
    weights go as CUDA IPC handles (``engine.weight_sync: tensor``) without a copy. The engines
    are started with SGLang's ``--enable-memory-saver``; the job calls
    ``/release_memory_occupation`` once a step's rollouts are in and ``/resume_memory_occupation``
    before the weight sync, so the trainer has the GPUs' memory while it trains.

``plan_placement`` is a pure function (tested on its own); ``reserve`` asks Ray for the
bundles and fails with a message that names the GPUs missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["disaggregated", "colocated"]


@dataclass(frozen=True)
class PlacementPlan:
    """bundles: Ray resource bundles, in order. trainer_bundle[r]: rank r's bundle.
    engine_bundle[e]: engine e's bundle. trainer_gpus / engine_gpus: ``num_gpus`` each actor asks."""

    mode: Mode
    bundles: list[dict[str, float]]
    trainer_bundle: list[int]
    engine_bundle: list[int]
    trainer_gpus: float
    engine_gpus: float

    @property
    def total_gpus(self) -> int:
        return int(sum(b.get("GPU", 0) for b in self.bundles))


def plan_placement(mode: Mode, trainer_ranks: int, num_engines: int, engine_tp: int, num_roles: int = 1,
                   gpus_per_node: int = 8, cpus_per_bundle: float = 1) -> PlacementPlan:
    """The bundles of a job with ``trainer_ranks`` ranks (of each of ``num_roles`` trainer roles)
    and ``num_engines`` engines of ``engine_tp`` GPUs. Raises ValueError if the layout cannot work."""
    if engine_tp > gpus_per_node:
        raise ValueError(f"engine.sglang.tp_size={engine_tp} does not fit in a node of {gpus_per_node} GPUs")
    if mode == "disaggregated":
        bundles = [{"GPU": 1.0, "CPU": cpus_per_bundle} for _ in range(trainer_ranks)]
        bundles += [{"GPU": float(engine_tp), "CPU": cpus_per_bundle} for _ in range(num_engines)]
        return PlacementPlan(mode, bundles, list(range(trainer_ranks)),
                             [trainer_ranks + e for e in range(num_engines)], 1.0 / num_roles, float(engine_tp))
    if mode == "colocated":
        if gpus_per_node % engine_tp:
            raise ValueError(f"ray.placement=colocated: engine.sglang.tp_size={engine_tp} must divide "
                             f"ray.gpus_per_node={gpus_per_node} so an engine's GPUs are consecutive on one node")
        n = max(trainer_ranks, num_engines * engine_tp)
        share = 1.0 / (num_roles + 1)
        return PlacementPlan(mode, [{"GPU": 1.0, "CPU": cpus_per_bundle} for _ in range(n)], list(range(trainer_ranks)),
                             [e * engine_tp for e in range(num_engines)], share, share)
    raise ValueError(f"ray.placement: {mode!r} is not one of disaggregated, colocated")


def reserve(plan: PlacementPlan, timeout_s: float = 300.0) -> Any:
    """Create and wait for the placement group of ``plan``; RuntimeError naming what is missing
    (at once if the cluster has fewer GPUs in all, else after ``timeout_s``)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    have = ray.cluster_resources().get("GPU", 0)
    pg = placement_group(plan.bundles, strategy="PACK") if have >= plan.total_gpus else None
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s) if pg is not None else ([], [])
    if not ready:
        if pg is not None:
            remove_placement_group(pg)
        raise RuntimeError(
            f"ray.placement={plan.mode}: the job needs {plan.total_gpus} GPUs in {len(plan.bundles)} bundles "
            f"and the Ray cluster has {have:g} GPUs in all (or not enough free within {timeout_s:g} s). "
            "Lower trainer.world_size / engine.num_engines / engine.sglang.tp_size, or add nodes.")
    return pg


def strategy(pg: Any, bundle: int) -> Any:
    """Ray scheduling strategy that puts an actor on ``bundle`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle,
                                            placement_group_capture_child_tasks=True)
