"""The distillation driver: ``relayrl distill``. One step is generate, score (student), score
(teachers), advantages, train actor, sync weights, log, checkpoint; the merged student is
written as an HF checkpoint at the end.

It is the RL driver (``rl.driver.train``) run with a ``DistillJob``: the task advantage is
replaced by, or added to, the per-token reverse KL to each sample's teacher (``opd.signal``).
Everything else is the RL job's own: rollout workers, buffer, engines, the DeepSpeed policy trainer, the clipped
policy-gradient loss (``rl.ppo.make_policy_loss_fn``), weight sync, checkpoints, resume, metrics.
The teachers live in a ``TeacherPool`` inside one Ray actor (``TeacherPoolActor``), so their
memory is not the driver's and the pool can sit on the hosts that have it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import torch

from relayrl.config import Config, ConfigError
from relayrl.rl.batching import pad
from relayrl.rl.driver import train
from relayrl.rl.job import Job
from relayrl.types import SubTrace

from .pool import CpuTeacherLoader, PoolBudgetError, TeacherPool
from .routing import Router, check_same_tokenizer
from .signal import clipped_fraction, opd_advantages, sampled_reverse_kl



@ray.remote
class TeacherPoolActor:
    """A ``TeacherPool`` in its own process (an async actor: one step's scoring awaits many
    engine requests at once)."""

    def __init__(self, *args: Any) -> None:
        self.pool = TeacherPool(*args)

    async def score(self, requests: list[tuple[str, list[int]]], temperature: float) -> list[list[float]]:
        return await self.pool.score_async(requests, temperature)

    async def stats(self) -> dict[str, float]:
        return self.pool.stats()

    async def close(self) -> None:
        self.pool.close()


STUDENT_DIR = "student"


def check_distill(cfg: Config, student_path: str, task_domains: list[str], source: str) -> Router:
    """Every start-up check of a distillation job (no teacher is loaded): teachers configured,
    their directories and tokenizers, the tasks' domains routable, the pool budget feasible."""
    d = cfg.distill
    if not d.teachers:
        raise ConfigError("distill.teachers: no teachers configured. List them as {name, path, domains} "
                          "entries (see configs/distill_10_experts.yaml).")
    check_same_tokenizer(student_path, d.teachers)
    router = Router(d.teachers, d.fallback_teacher)
    router.check_domains(task_domains, source)
    try:
        TeacherPool(d.teachers, loader=lambda t: None, max_resident=d.max_resident_teachers,
                    memory_budget_bytes=pool_budget_bytes(cfg))
    except PoolBudgetError as e:
        raise ConfigError(f"distill.pool_memory_gb: {e}; raise the budget") from None
    return router


def pool_budget_bytes(cfg: Config) -> int | None:
    gb = cfg.distill.pool_memory_gb
    return None if gb is None else int(gb * 2**30)


def teacher_loader(cfg: Config) -> CpuTeacherLoader:
    return CpuTeacherLoader(max_batch_size=cfg.engine.max_batch_size, max_seq_len=cfg.engine.max_seq_len,
                            num_threads=cfg.distill.teacher_threads or os.cpu_count(), dtype=cfg.model.dtype)


class DistillJob(Job):
    """The RL ``Job`` plus a teacher pool and a router; no critic unless the task advantage
    needs one (``distill.add_task_advantage`` with ``algorithm.estimator: gae``)."""

    def _check_plugins(self) -> None:
        super()._check_plugins()
        source = self.cfg.env.tasks or f"the built-in tasks of {self.cfg.env.name!r}"
        self.router = check_distill(self.cfg, self.model_path, [str(t.get("domain", "")) for t in self.tasks], source)

    distills = True

    def needs_critic(self) -> bool:
        return self.uses_task_advantage() and self.cfg.algorithm.estimator == "gae"

    def uses_task_advantage(self) -> bool:
        return self.cfg.distill.add_task_advantage

    def _build(self) -> None:
        super()._build()
        cfg = self.cfg
        d = cfg.distill
        self.pool = TeacherPoolActor.options(num_cpus=0).remote(
            d.teachers, teacher_loader(cfg), d.max_resident_teachers, pool_budget_bytes(cfg))

    def teacher_score(self, subs: list[SubTrace], samples: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """``teacher_logprobs`` of every sample from its domain's teacher; pool metrics."""
        requests = [(self.router.teacher_for(s.domain), s.tokens) for s in subs]
        scored = ray.get(self.pool.score.remote(requests, self.cfg.distill.teacher_temperature))
        for smp, lp in zip(samples, scored, strict=True):
            smp["teacher_logprobs"] = torch.tensor(lp, dtype=torch.float32) * smp["loss_mask"]
        stats = ray.get(self.pool.stats.remote())
        return {f"opd/teacher_{k}": v for k, v in stats.items()}

    def distill_advantages(self, subs: list[SubTrace], samples: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        return distill_advantages(subs, samples, self.cfg, self.router)

    def finish(self) -> None:
        self.export_student()

    def export_student(self) -> Path:
        out = self.run_dir / STUDENT_DIR
        self.policy.export_hf(str(out))
        return out

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                ray.get(pool.close.remote(), timeout=30)
                ray.kill(pool)
            except Exception:
                pass
            self.pool = None
        super().close()


def distill_advantages(subs: list[SubTrace], samples: list[dict[str, torch.Tensor]], cfg: Config,
                       router: Router) -> dict[str, float]:
    """Set each sample's ``advantages`` to the distillation advantage (plus its task advantage,
    already in ``advantages``, when ``distill.add_task_advantage``); per-domain KL metrics."""
    d = cfg.distill
    if not samples:
        return {}
    masks = pad([s["loss_mask"] for s in samples])
    student = pad([s["old_logprobs"] for s in samples])
    teacher = pad([s["teacher_logprobs"] for s in samples])
    # The per-teacher weight scales the coefficient row by row.
    coef = torch.tensor([d.coef * router.weight_of(s.domain) for s in subs])[:, None]
    task = pad([s["advantages"] for s in samples]) if d.add_task_advantage else None
    adv = opd_advantages(student, teacher, masks, coef, d.advantage_clip, task, baseline=d.baseline)
    for i, s in enumerate(samples):
        s["advantages"] = adv[i, : len(s["tokens"])].clone()
    kl = sampled_reverse_kl(student, teacher, masks)
    n = masks.sum().clamp(min=1)
    metrics: dict[str, float] = {
        "opd/reverse_kl": float((kl * (masks.sum(-1) > 0)).sum() / max(len(subs), 1)),
        "opd/adv_mean": float(adv.sum() / n),
        "opd/adv_clipfrac": float(clipped_fraction(student, teacher, masks, coef, d.advantage_clip)),
    }
    by_domain: dict[str, list[float]] = {}
    for s, k in zip(subs, kl.tolist(), strict=True):
        by_domain.setdefault(s.domain, []).append(k)
    for dom, vals in sorted(by_domain.items()):
        metrics[f"opd/reverse_kl/{dom or '_'}"] = sum(vals) / len(vals)
    return metrics


def distill(cfg: Config) -> Path:
    """Run (or resume) a distillation job; return its run directory (the student is in
    ``<run_dir>/student``)."""
    return train(cfg, DistillJob)
