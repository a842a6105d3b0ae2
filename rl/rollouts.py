"""Driver-side rollout scheduling: which episodes run when, and waiting for a step's batch.

Slots are issued in data order, ``tasks_per_step`` per training step, each slot a group of
``group_size`` episodes. With ``max_weight_lag = L`` the episodes of the next L steps are
already running while the trainer works on this one (partial rollouts continue across weight
updates; the buffer drops groups older than L versions). With L = 0 generation waits for
training: on-policy.
"""

from __future__ import annotations

from typing import Any

import ray

from relayrl.config import Config
from relayrl.rollout.agent import EpisodeJob
from relayrl.types import Trajectory

from .data import TaskOrder, jobs_for_slots


class RolloutScheduler:
    def __init__(self, cfg: Config, workers: list[Any], buffer: Any, tasks: list[dict[str, Any]],
                 slot_cursor: int) -> None:
        self.cfg = cfg
        self.workers = workers
        self.buffer = buffer
        self.tasks = tasks
        self.order = TaskOrder(len(tasks), cfg.run.seed)
        self.slot_cursor = slot_cursor
        self._pending: list[ray.ObjectRef] = []
        self._next_worker = 0

    @property
    def per_step(self) -> int:
        return self.cfg.rollout.tasks_per_step

    def _dispatch(self, jobs: list[EpisodeJob]) -> None:
        if not jobs:
            return
        n = len(self.workers)
        chunks: list[list[EpisodeJob]] = [[] for _ in range(n)]
        for job in jobs:  # whole groups stay together on one worker, round-robin over groups
            chunks[(self._next_worker + job.task_index) % n].append(job)
        self._next_worker = (self._next_worker + 1) % n
        for worker, chunk in zip(self.workers, chunks, strict=True):
            if chunk:
                self._pending.append(worker.run.remote(chunk))

    def resume(self, consumed: set[str], held: set[str]) -> int:
        """Re-issue episodes that were in flight when the run stopped (neither trained on nor
        finished). Returns how many."""
        lag = self.cfg.rollout.max_weight_lag
        start = max(0, self.slot_cursor - (lag + 2) * self.per_step)
        jobs = jobs_for_slots(self.tasks, self.order, range(start, self.slot_cursor),
                              self.cfg.rollout.group_size, self.cfg.run.seed, skip=consumed | held)
        self._dispatch(jobs)
        return len(jobs)

    def _issue_through(self, step: int) -> None:
        """Make sure the slots of every step up to ``step`` have been issued."""
        end = (step + 1) * self.per_step
        if end <= self.slot_cursor:
            return
        jobs = jobs_for_slots(self.tasks, self.order, range(self.slot_cursor, end),
                              self.cfg.rollout.group_size, self.cfg.run.seed)
        self.slot_cursor = end
        self._dispatch(jobs)

    def _raise_worker_errors(self) -> None:
        if not self._pending:
            return
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        ray.get(done)  # re-raises an exception a worker died with

    def collect(self, step: int, weight_version: int) -> list[list[Trajectory]]:
        """Issue this step's (and the look-ahead steps') episodes; wait for this step's groups."""
        self._issue_through(step + self.cfg.rollout.max_weight_lag)
        ordered = self.cfg.run.deterministic
        ref = self.buffer.get_groups.remote(self.per_step, weight_version, None, ordered)
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            self._raise_worker_errors()
            if ready:
                return ray.get(ref)

    def idle(self) -> bool:
        self._raise_worker_errors()
        return not self._pending
