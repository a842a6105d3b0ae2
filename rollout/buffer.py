"""The rollout buffer: finished trajectories wait here for the trainer.

- Every finished trajectory is appended to ``<run_dir>/rollouts/finished.jsonl`` (flushed and
  fsynced) the moment it arrives, so a crash never loses one.
- Trajectories are handed out by *group* (the episodes of one task), whole groups only, so
  group-relative estimators always see complete groups.
- Staleness bound: a group sampled by weights older than ``current_version - max_weight_lag``
  is dropped (counted in metrics). ``max_weight_lag = 0`` is on-policy.
- Consumption is committed by the checkpoint (``consumed`` ids are part of it): after a
  resume, every finished trajectory that no checkpointed step trained on is available again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from pathlib import Path

from relayrl.types import Trajectory


class Buffer:
    def __init__(self, run_dir: str, group_size: int, max_weight_lag: int) -> None:
        self.group_size = group_size
        self.max_weight_lag = max_weight_lag
        self.dir = Path(run_dir) / "rollouts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "finished.jsonl"
        self._groups: OrderedDict[str, list[Trajectory]] = OrderedDict()
        self._ready = asyncio.Event()
        self._consumed: set[str] = set()
        self.num_dropped_stale = 0
        self.num_failed = 0
        self.num_put = 0

    # -- persistence ---------------------------------------------------------------------------

    def restore(self, consumed_ids: list[str]) -> dict[str, int]:
        """After a resume: reload every finished trajectory not in ``consumed_ids``."""
        self._consumed = set(consumed_ids)
        self._groups.clear()
        reloaded = 0
        seen: set[str] = set()
        if self.path.exists():
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash mid-write
                    traj = Trajectory.from_json(rec["trajectory"])
                    if traj.trajectory_id in self._consumed or traj.trajectory_id in seen:
                        continue
                    seen.add(traj.trajectory_id)
                    self._groups.setdefault(rec["group_id"], []).append(traj)
                    reloaded += 1
        self._ready.set()
        return {"reloaded": reloaded}

    def known_trajectory_ids(self) -> list[str]:
        """Ids of trajectories held (finished, not yet consumed)."""
        return [t.trajectory_id for g in self._groups.values() for t in g]

    # -- producer side -------------------------------------------------------------------------

    def put(self, traj: Trajectory, group_id: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"group_id": group_id, "trajectory": traj.to_json()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.num_put += 1
        self.num_failed += int(traj.failed)
        self._groups.setdefault(group_id, []).append(traj)
        self._ready.set()

    # -- consumer side -------------------------------------------------------------------------

    def _complete_groups(self) -> list[str]:
        return [g for g, trajs in self._groups.items() if len(trajs) >= self.group_size]

    def _is_stale(self, trajs: list[Trajectory], current_version: int) -> bool:
        versions = [s.weight_version for t in trajs for s in t.sub_traces]
        return bool(versions) and min(versions) < current_version - self.max_weight_lag

    async def get_groups(self, num_groups: int, current_version: int, timeout_s: float | None = None,
                         ordered: bool = False) -> list[list[Trajectory]]:
        """Wait for ``num_groups`` complete, fresh groups and hand them out.

        ordered: sort the groups by id and each group's trajectories by id (deterministic mode).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            for gid in self._complete_groups():
                if self._is_stale(self._groups[gid], current_version):
                    for t in self._groups.pop(gid):
                        self._consumed.add(t.trajectory_id)
                    self.num_dropped_stale += 1
            ready = self._complete_groups()
            if len(ready) >= num_groups:
                chosen = sorted(ready)[:num_groups] if ordered else ready[:num_groups]
                out = [self._groups.pop(g) for g in chosen]
                self._consumed.update(t.trajectory_id for g in out for t in g)
                if ordered:
                    out = [sorted(g, key=lambda t: t.trajectory_id) for g in out]
                return out
            self._ready.clear()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"buffer: {len(ready)} of {num_groups} groups ready after {timeout_s} s")
            try:
                await asyncio.wait_for(self._ready.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                pass

    def consumed_ids(self) -> list[str]:
        """Trajectories handed out or dropped as stale; saved with each checkpoint, which the
        driver writes only after training on everything it was handed."""
        return sorted(self._consumed)

    def stats(self) -> dict[str, int]:
        return {
            "buffer/groups_waiting": len(self._groups),
            "buffer/dropped_stale_groups": self.num_dropped_stale,
            "buffer/failed_episodes": self.num_failed,
            "buffer/received": self.num_put,
        }
