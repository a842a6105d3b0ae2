"""The teacher pool: score token ids with many teachers when they do not all fit in memory.

Each teacher is an ``Engine`` (``rollout/engine.py``; ``score(token_ids)`` gives per-token
logprobs). The pool keeps at most ``max_resident`` of them loaded and their weights within a
byte budget, loading and evicting as a step's requests need.

Scheduling and eviction, and why
--------------------------------
One ``score`` call is a whole training step's requests. They are grouped per teacher (each
teacher is visited once per call, all its sequences submitted together so its engine batches
them), and the teachers are visited *resident first*: the ones already loaded are served
before any load happens, then the missing ones are loaded one at a time. When a load needs
room, the least recently used resident is evicted (LRU). Because the residents were served
first, every resident is already done with this call when evictions start, so an eviction
never forces a reload within the call: a call that needs n teachers of which r are loaded does
exactly n - r loads, the fewest possible. Plain LRU in a fixed teacher order would not: with
10 teachers needed every step and room for 4, a fixed order evicts each teacher just before it
is needed again and loads all 10 every step; resident-first loads 6. Across calls, LRU keeps
the teachers used last, a good guess when domain mixes drift slowly; when every step needs
every teacher (uniform domains) any choice is as good as Belady's.

``schedule="config_order"`` turns resident-first off (a baseline for the benchmark).

Metrics (``stats()``, per call): ``loads``, ``evictions``, ``resident``, ``tokens``,
``score_s``, ``load_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from relayrl.config import TeacherConfig

Schedule = Literal["resident_first", "config_order"]


class PoolBudgetError(ValueError):
    """A teacher cannot be loaded within the pool's budget even alone."""


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint's weight files (safetensors, else .bin): the memory its weights take
    at their stored dtype, the pool's cost of keeping it loaded."""
    p = Path(path)
    files = list(p.glob("*.safetensors")) or list(p.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


@dataclass
class CpuTeacherLoader:
    """Loads a teacher as an in-process ``CpuEngine`` (picklable, so the pool can run in a Ray
    actor). The GPU path would load an SGLang engine the same way behind the same seam."""

    max_batch_size: int = 32
    max_seq_len: int = 2048
    num_threads: int | None = None
    dtype: str = "float32"

    def __call__(self, teacher: TeacherConfig) -> Any:
        from relayrl.rollout.cpu_engine import CpuEngine

        return CpuEngine(teacher.path, max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len,
                         num_threads=self.num_threads, dtype=self.dtype, max_prefill_tokens=8192)


def _unload(engine: Any) -> None:
    for name in ("shutdown", "close"):
        fn = getattr(engine, name, None)
        if fn is not None:
            fn()
            return


class TeacherPool:
    """Teachers loaded on demand under a budget (module docstring).

    teachers: every teacher of the job.
    loader: teacher -> a loaded ``Engine``; its ``shutdown()``/``close()`` (if any) unloads it.
    max_resident: most teachers loaded at once (None = no count limit).
    memory_budget_bytes: most bytes of loaded weights (None = no byte limit).
    size_of: teacher -> bytes it takes (default: its checkpoint's weight files).
    schedule: ``resident_first`` (default) or ``config_order``.
    """

    def __init__(self, teachers: list[TeacherConfig], loader: Callable[[TeacherConfig], Any],
                 max_resident: int | None = None, memory_budget_bytes: int | None = None,
                 size_of: Callable[[TeacherConfig], int] | None = None,
                 schedule: Schedule = "resident_first") -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.teachers = {t.name: t for t in teachers}
        self.order = [t.name for t in teachers]
        self.loader = loader
        self.max_resident = max_resident
        self.budget = memory_budget_bytes
        size_of = size_of or (lambda t: checkpoint_bytes(t.path))
        self.sizes = {t.name: int(size_of(t)) for t in teachers}
        self.schedule = schedule
        if self.budget is not None:
            for name, size in self.sizes.items():
                if size > self.budget:
                    raise PoolBudgetError(
                        f"teacher {name!r} takes {size / 2**30:.3f} GiB, more than the whole pool budget "
                        f"({self.budget / 2**30:.3f} GiB)")
        self.resident: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self.total_loads = 0
        self.total_evictions = 0
        self._reset_counters()

    # -- budget --------------------------------------------------------------------------------

    def _fits(self, extra: str) -> bool:
        names = list(self.resident) + [extra]
        if self.max_resident is not None and len(names) > self.max_resident:
            return False
        return self.budget is None or sum(self.sizes[n] for n in names) <= self.budget

    def _evict_one(self) -> None:
        name, engine = self.resident.popitem(last=False)
        _unload(engine)
        self._evictions += 1
        self.total_evictions += 1

    def ensure_loaded(self, name: str) -> Any:
        """The teacher's engine, loading it (and evicting LRU residents) if needed."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        while self.resident and not self._fits(name):
            self._evict_one()
        t0 = time.perf_counter()
        engine = self.loader(self.teachers[name])
        self._load_s += time.perf_counter() - t0
        self._loads += 1
        self.total_loads += 1
        self.resident[name] = engine
        return engine

    def visit_order(self, needed: list[str]) -> list[str]:
        """The order a call serves ``needed`` teachers in (module docstring)."""
        needed_set = set(needed)
        ordered = [n for n in self.order if n in needed_set]
        if self.schedule == "config_order":
            return ordered
        resident = [n for n in self.resident if n in needed_set]  # LRU order among residents
        return resident + [n for n in ordered if n not in self.resident]

    # -- scoring -------------------------------------------------------------------------------

    async def score_async(self, requests: list[tuple[str, list[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Per request (teacher name, token ids): the teacher's logprob of each token (position 0
        holds 0.0), in request order."""
        by_teacher: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(requests):
            if name not in self.teachers:
                raise KeyError(f"unknown teacher {name!r}; known: {self.order}")
            by_teacher.setdefault(name, []).append(i)
        out: list[list[float] | None] = [None] * len(requests)
        for name in self.visit_order(list(by_teacher)):
            engine = self.ensure_loaded(name)
            idx = by_teacher[name]
            t0 = time.perf_counter()
            results = await asyncio.gather(*(engine.score(requests[i][1], temperature) for i in idx))
            self._score_s += time.perf_counter() - t0
            for i, lp in zip(idx, results, strict=True):
                out[i] = list(lp)
                self._tokens += len(requests[i][1])
        return out  # type: ignore[return-value]

    def score(self, requests: list[tuple[str, list[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Blocking ``score_async`` (for callers without an event loop, e.g. a Ray actor method)."""
        return asyncio.run(self.score_async(requests, temperature))

    # -- metrics and teardown ------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._loads = self._evictions = self._tokens = 0
        self._score_s = self._load_s = 0.0

    def stats(self, reset: bool = True) -> dict[str, float]:
        """Counters since the last reset: loads (swaps in), evictions, tokens scored, seconds."""
        out = {"loads": float(self._loads), "evictions": float(self._evictions),
               "resident": float(len(self.resident)), "tokens": float(self._tokens),
               "score_s": self._score_s, "load_s": self._load_s,
               "tokens_per_s": self._tokens / self._score_s if self._score_s > 0 else 0.0}
        if reset:
            self._reset_counters()
        return out

    def resident_names(self) -> list[str]:
        return list(self.resident)

    def close(self) -> None:
        while self.resident:
            _, engine = self.resident.popitem(last=False)
            _unload(engine)
