"""Placement of trainer ranks and SGLang engines: the plans worked by hand, and Ray placing
actors by them on a local Ray with logical GPUs (``ray.init(num_gpus=4)``: Ray hands out GPU
ids without any GPU present, which is exactly the bookkeeping under test)."""

from __future__ import annotations

import pytest

from relayrl.rl.placement import plan_placement


def test_disaggregated_plan():
    # 2 trainer ranks (policy + critic: 2 roles) and 2 engines of TP 2: 2 + 2*2 = 6 GPUs.
    p = plan_placement("disaggregated", trainer_ranks=2, num_engines=2, engine_tp=2, num_roles=2)
    assert [b["GPU"] for b in p.bundles] == [1, 1, 2, 2]
    assert p.trainer_bundle == [0, 1] and p.engine_bundle == [2, 3]
    assert (p.trainer_gpus, p.engine_gpus, p.total_gpus) == (0.5, 2.0, 6)


def test_colocated_plan():
    # 4 trainer ranks and 2 engines of TP 2 on the same 4 GPUs; 2 roles + the engine share each GPU.
    p = plan_placement("colocated", trainer_ranks=4, num_engines=2, engine_tp=2, num_roles=2)
    assert [b["GPU"] for b in p.bundles] == [1, 1, 1, 1]
    assert p.trainer_bundle == [0, 1, 2, 3] and p.engine_bundle == [0, 2]
    assert p.trainer_gpus == p.engine_gpus == pytest.approx(1 / 3)


def test_impossible_layouts_are_named():
    with pytest.raises(ValueError, match="tp_size=3 must divide ray.gpus_per_node=8"):
        plan_placement("colocated", 6, 2, 3)
    with pytest.raises(ValueError, match="does not fit in a node of 8 GPUs"):
        plan_placement("disaggregated", 1, 1, 16)


def test_ray_places_actors_by_the_plan():
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import remove_placement_group

    from relayrl.rl.placement import reserve, strategy

    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def gpus(self):
                return [str(g) for g in ray.get_gpu_ids()]

        for mode in ("disaggregated", "colocated"):
            plan = plan_placement(mode, trainer_ranks=2, num_engines=1, engine_tp=2, num_roles=1, cpus_per_bundle=0)
            pg = reserve(plan, timeout_s=60)
            trainers = [Probe.options(num_gpus=plan.trainer_gpus, scheduling_strategy=strategy(pg, b)).remote()
                        for b in plan.trainer_bundle]
            engine = Probe.options(num_gpus=plan.engine_gpus,
                                   scheduling_strategy=strategy(pg, plan.engine_bundle[0])).remote()
            t = [set(g) for g in ray.get([a.gpus.remote() for a in trainers])]
            e = set(ray.get(engine.gpus.remote()))
            assert all(len(g) == 1 for g in t) and t[0] != t[1], mode
            if mode == "disaggregated":
                assert len(e) == 2 and not (e & (t[0] | t[1]))  # 4 distinct GPUs in all
            else:
                assert e == t[0]  # the engine sits on trainer rank 0's GPU
            for a in [*trainers, engine]:
                ray.kill(a)
            remove_placement_group(pg)
        with pytest.raises(RuntimeError, match="needs 8 GPUs"):
            reserve(plan_placement("disaggregated", 4, 2, 2), timeout_s=3)
    finally:
        ray.shutdown()
