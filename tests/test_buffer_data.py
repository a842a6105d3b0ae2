"""The buffer persists, groups, filters stale groups and restores; data order is deterministic."""

from __future__ import annotations

import asyncio

import pytest

from relayrl.rl.checkpoint import CheckpointManager, DriverState
from relayrl.rl.data import TaskOrder, episode_seed, jobs_for_slots
from relayrl.rollout.buffer import Buffer
from relayrl.types import SubTrace, Trajectory


def traj(tid: str, version: int = 0, reward: float = 1.0) -> Trajectory:
    sub = SubTrace(tokens=[1, 2, 3], loss_mask=[0, 1, 1], rollout_logprobs=[0.0, -0.5, -0.25],
                   reward=reward, trajectory_id=tid, weight_version=version)
    return Trajectory(tid, [sub], reward, {"turns": 1.0})


def test_groups_are_handed_out_whole_and_in_order(tmp_path):
    buf = Buffer(str(tmp_path), group_size=2, max_weight_lag=0)
    buf.put(traj("t1-s0"), "g1")
    buf.put(traj("t0-s1"), "g0")
    buf.put(traj("t1-s1"), "g1")

    async def get():
        return await buf.get_groups(1, current_version=0, ordered=True)

    out = asyncio.run(get())  # only g1 is complete
    assert [[t.trajectory_id for t in g] for g in out] == [["t1-s0", "t1-s1"]]
    with pytest.raises(TimeoutError):
        asyncio.run(buf.get_groups(1, current_version=0, timeout_s=0.05))


def test_stale_groups_are_dropped_by_the_lag_bound(tmp_path):
    buf = Buffer(str(tmp_path), group_size=1, max_weight_lag=1)
    buf.put(traj("a", version=3), "ga")  # 5 - 1 = 4 > 3: stale
    buf.put(traj("b", version=4), "gb")  # within the bound
    out = asyncio.run(buf.get_groups(1, current_version=5, timeout_s=1))
    assert out[0][0].trajectory_id == "b"
    assert buf.stats()["buffer/dropped_stale_groups"] == 1
    assert "a" in buf.consumed_ids() and "b" in buf.consumed_ids()


def test_restore_reloads_finished_but_unconsumed(tmp_path):
    buf = Buffer(str(tmp_path), group_size=1, max_weight_lag=0)
    for name in ("x", "y", "z"):
        buf.put(traj(name), f"g{name}")
    consumed = [t.trajectory_id for g in asyncio.run(buf.get_groups(1, 0, ordered=True)) for t in g]
    assert consumed == ["x"]
    # A torn last line (crash mid-write) is ignored.
    with open(tmp_path / "rollouts" / "finished.jsonl", "a") as f:
        f.write('{"group_id": "gq", "traj')
    fresh = Buffer(str(tmp_path), group_size=1, max_weight_lag=0)
    assert fresh.restore(consumed) == {"reloaded": 2}
    assert sorted(fresh.known_trajectory_ids()) == ["y", "z"]


def test_task_order_is_a_pure_function_of_seed_and_slot():
    a, b = TaskOrder(10, seed=3), TaskOrder(10, seed=3)
    first = [a.task_at(s) for s in range(25)]
    assert first == [b.task_at(s) for s in range(25)]
    assert sorted(first[:10]) == list(range(10))  # each epoch is a permutation
    assert sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]
    assert TaskOrder(10, seed=4).task_at(0) != a.task_at(0) or TaskOrder(10, seed=4).task_at(1) != a.task_at(1)
    # Asking out of order gives the same answers (a resumed run starts mid-epoch).
    assert [TaskOrder(10, 3).task_at(s) for s in (24, 3, 17)] == [first[24], first[3], first[17]]


def test_jobs_skip_known_trajectories_and_seed_per_episode():
    tasks = [{"id": i} for i in range(4)]
    order = TaskOrder(4, 0)
    jobs = jobs_for_slots(tasks, order, range(2), group_size=2, run_seed=0)
    assert [j.trajectory_id for j in jobs] == ["t00000000-s000", "t00000000-s001", "t00000001-s000", "t00000001-s001"]
    assert jobs[0].seed == episode_seed(0, 0, 0) != jobs[1].seed
    skipped = jobs_for_slots(tasks, order, range(2), 2, 0, skip={"t00000000-s001"})
    assert len(skipped) == 3


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)

    def writer(path: str) -> None:
        import os
        os.makedirs(path)
        open(os.path.join(path, "w"), "w").write("x")

    for step in (1, 2, 3):
        mgr.save(DriverState(step=step, weight_version=step), {"policy": writer})
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000002", "step_000003"]
    # A crash mid-write leaves a .tmp directory, which is not a checkpoint.
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()
    latest = mgr.latest()
    assert latest is not None and latest.name == "step_000003"
    assert CheckpointManager.load_state(latest).weight_version == 3
