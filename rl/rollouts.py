"""Driver-side rollout scheduling: which episodes run when, and waiting for a step's batch.

Slots are issued in data order, ``tasks_per_step`` per training step, each slot a group of
``group_size`` episodes. With ``max_weight_lag = L`` the episodes of the next L steps are
already running while the trainer works on this one (partial rollouts continue across weight
updates; the buffer drops groups older than L versions). With L = 0 generation waits for
training: on-policy.
"""

from __future__ import annotations

from typing import Any, Callable

import ray

from relayrl.config import Config
from relayrl.rollout.agent import EpisodeJob
from relayrl.types import Trajectory

from .data import TaskOrder, jobs_for_slots


class RolloutScheduler:
    """Issues episodes to the workers and waits for each step's groups.

    Fault tolerance: a worker whose actor dies (``RayActorError``) is replaced by
    ``respawn_worker(i)`` and its unfinished episodes (those of its lost calls whose trajectories
    the buffer neither holds nor has handed out) are issued again to the replacement, at most
    ``max_worker_restarts`` times per run. Finished trajectories live in the buffer actor and its
    fsynced file, so none is lost with the worker. ``on_wait()`` runs about once a second while
    ``collect`` waits (the job probes and restarts engines there); ``on_collected()`` once the
    step's groups are in (colocated engines release their GPU memory to the trainer there).
    """

    def __init__(self, cfg: Config, workers: list[Any], buffer: Any, tasks: list[dict[str, Any]],
                 slot_cursor: int, respawn_worker: Callable[[int], Any] | None = None,
                 on_wait: Callable[[], None] | None = None, max_worker_restarts: int = 3,
                 on_collected: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.workers = workers
        self.respawn_worker = respawn_worker
        self.on_wait = on_wait
        self.on_collected = on_collected
        self.max_worker_restarts = max_worker_restarts
        self.worker_restarts = 0
        self._jobs_of: dict[ray.ObjectRef, tuple[int, list[EpisodeJob]]] = {}
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
        for i, (worker, chunk) in enumerate(zip(self.workers, chunks, strict=True)):
            if chunk:
                self._submit(i, chunk)

    def _submit(self, i: int, chunk: list[EpisodeJob]) -> None:
        ref = self.workers[i].run.remote(chunk)
        self._pending.append(ref)
        self._jobs_of[ref] = (i, chunk)

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
        for ref in done:
            i, chunk = self._jobs_of.pop(ref)
            try:
                ray.get(ref)  # re-raises an exception a worker's episodes raised
            except ray.exceptions.RayActorError:
                self._replace_worker(i, chunk)

    def _replace_worker(self, i: int, chunk: list[EpisodeJob]) -> None:
        if self.respawn_worker is None or self.worker_restarts >= self.max_worker_restarts:
            raise RuntimeError(f"rollout worker {i} died and {self.worker_restarts} restarts were already made "
                               f"(limit {self.max_worker_restarts}); see the Ray logs for why it died")
        self.worker_restarts += 1
        self.workers[i] = self.respawn_worker(i)
        done = set(ray.get(self.buffer.known_trajectory_ids.remote())) | set(ray.get(self.buffer.consumed_ids.remote()))
        redo = [j for j in chunk if j.trajectory_id not in done]
        if redo:
            self._submit(i, redo)

    def collect(self, step: int, weight_version: int) -> list[list[Trajectory]]:
        """Issue this step's (and the look-ahead steps') episodes; wait for this step's groups."""
        self._issue_through(step + self.cfg.rollout.max_weight_lag)
        ordered = self.cfg.run.deterministic
        ref = self.buffer.get_groups.remote(self.per_step, weight_version, None, ordered)
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            self._raise_worker_errors()
            if self.on_wait is not None and not ready:
                self.on_wait()
            if ready:
                groups = ray.get(ref)
                if self.on_collected is not None:
                    self.on_collected()
                return groups

    def idle(self) -> bool:
        self._raise_worker_errors()
        return not self._pending
