"""Tasks and their order: a deterministic function of (seed, slot), so a resumed run sees the
same data order as an uninterrupted one without storing more than a cursor.
"""

from __future__ import annotations

import inspect
import random
import zlib
from pathlib import Path
from typing import Any

from relayrl.config import ConfigError, EnvConfig
from relayrl.envs.taskgen import task_set
from relayrl.rollout.agent import EpisodeJob


def load_tasks(env_cfg: EnvConfig, env_cls: Any, seed: int) -> list[dict[str, Any]]:
    """Tasks from ``env.tasks`` (a generated task set's name such as ``pyfunc:train`` or
    ``pyfunc:heldout:50``, see ``envs/taskgen.py``; else a jsonl / parquet file read through
    ``datasets``) or the env's own, each checked by the env's ``check_task`` (if it has one)
    before anything starts."""
    if env_cfg.tasks is None:
        if not hasattr(env_cls, "default_tasks"):
            raise ConfigError(f"env.tasks: the environment {env_cfg.name!r} has no built-in tasks; "
                              "give a jsonl or parquet file of tasks")
        # The env's kwargs that its task generator also takes (num_turns, ...) shape its tasks.
        accepted = inspect.signature(env_cls.default_tasks).parameters
        task_kwargs = {k: v for k, v in env_cfg.kwargs.items() if k in accepted and k != "seed"}
        tasks = list(env_cls.default_tasks(seed=seed, **task_kwargs))
        source = f"the built-in tasks of {env_cfg.name!r}"
    else:
        try:
            tasks = task_set(env_cfg.tasks)  # a generated set's name (pyfunc:heldout:50), else None
        except ValueError as e:
            raise ConfigError(f"env.tasks: {e}") from None
        if tasks is None:
            tasks = _read_task_file(Path(env_cfg.tasks))
        source = str(env_cfg.tasks)
    check = getattr(env_cls, "check_task", None)
    if check is not None:
        for i, task in enumerate(tasks):
            try:
                check(task)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"env.tasks: task {i} of {source} is not valid for {env_cfg.name!r}: {e}. "
                                  "See envs/tasks/README.md for the task schema.") from None
    return tasks


def _read_task_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"env.tasks: {path} does not exist. Give the path of a .jsonl or .parquet file of tasks.")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"env.tasks: {path} must end in .jsonl, .json or .parquet")
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise ConfigError(f"env.tasks: {path} could not be read as {kind} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Check the file's format.") from None
    tasks = [dict(row) for row in ds]
    if not tasks:
        raise ConfigError(f"env.tasks: {path} holds no tasks")
    return tasks


class TaskOrder:
    """Slot s of the run -> a task: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, num_tasks: int, seed: int) -> None:
        if num_tasks <= 0:
            raise ValueError("no tasks")
        self.num_tasks = num_tasks
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def task_at(self, slot: int) -> int:
        epoch, i = divmod(slot, self.num_tasks)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(self.num_tasks))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms = {epoch: perm}  # keep one epoch's permutation
        return perm[i]


def episode_seed(run_seed: int, slot: int, sample: int) -> int:
    return zlib.crc32(f"{run_seed}:{slot}:{sample}".encode()) & 0x7FFFFFFF


def jobs_for_slots(tasks: list[dict[str, Any]], order: TaskOrder, slots: range, group_size: int,
                   run_seed: int, skip: set[str] | None = None) -> list[EpisodeJob]:
    """The episode jobs of ``slots`` (group_size each), minus trajectory ids in ``skip``."""
    jobs = []
    for slot in slots:
        task = tasks[order.task_at(slot)]
        for sample in range(group_size):
            job = EpisodeJob(task=task, task_index=slot, sample_index=sample,
                             seed=episode_seed(run_seed, slot, sample))
            if skip is None or job.trajectory_id not in skip:
                jobs.append(job)
    return jobs
