"""The driver: one training step is generate, score, values, advantages, train critic, train
actor, sync weights, log, checkpoint. Details live one call down (``rl/job.py`` builds the
actors; ``rl/batching.py`` lines tokens up; ``rl/ppo.py`` holds the losses). A step with
nothing to train on (every episode failed or recorded no action) goes from generate straight to
eval and log, with a warning line and ``train/skipped`` 1.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from relayrl.config import Config

from .batching import (base_samples, flatten, gae_advantages, gradient_share_metrics, grpo_advantages,
                       nothing_to_train)
from .job import Job, rollout_metrics


class StepTimer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def train(cfg: Config, job_type: type[Job] = Job) -> Path:
    """Run (or resume) a training job; return its run directory.

    ``job_type`` adds stages without a second copy of this loop: a distillation job
    (``opd.distill.DistillJob``) scores every sample with its domain's teacher and turns the
    reverse KL into the advantage, in place of or on top of the task advantage.
    """
    with job_type.start(cfg) as job:
        state = job.state
        if state.step == 0 and job.eval_due(0):
            job.log(0, job.evaluate(0))
        for step in range(state.step, cfg.train.steps):
            timer = StepTimer()
            t0 = time.perf_counter()
            with timer("generate"):
                groups = job.rollouts.collect(step, state.weight_version)
            sub_traces = flatten(groups)
            metrics = rollout_metrics(groups, sub_traces) | gradient_share_metrics(sub_traces, cfg.algorithm)
            metrics |= job.record_verdicts(step + 1, groups)
            metrics["train/skipped"] = float(not sub_traces)
            if not sub_traces:  # every episode failed or recorded no action: nothing to learn from
                job.logger.message(nothing_to_train(step + 1, groups))
            else:
                samples = base_samples(sub_traces)
                with timer("score"):
                    job.score(samples)
                if job.distills:
                    with timer("teacher_score"):
                        metrics |= job.teacher_score(sub_traces, samples)
                if job.needs_critic():
                    with timer("values"):
                        raws = job.critic.forward_values(samples)
                    metrics |= gae_advantages(sub_traces, samples, raws, cfg.algorithm)
                    with timer("train_critic"):
                        metrics |= job.update(job.critic, samples, step, role="critic")
                elif job.uses_task_advantage():
                    metrics |= grpo_advantages(sub_traces, samples, cfg.algorithm)
                if job.distills:
                    metrics |= job.distill_advantages(sub_traces, samples)

                if step >= job.actor_start_step():
                    with timer("train_actor"):
                        metrics |= job.update(job.policy, samples, step, role="policy")
                    with timer("weight_sync"):
                        state.weight_version += 1
                        job.sync_weights(state.weight_version)

            if job.eval_due(step + 1):
                with timer("eval"):
                    metrics |= job.evaluate(step + 1)

            state.step = step + 1
            state.slot_cursor = job.rollouts.slot_cursor
            metrics |= timer.times | job.throughput(sub_traces, time.perf_counter() - t0)
            metrics |= job.buffer_stats()
            job.log(state.step, metrics)
            if state.step % cfg.train.save_every == 0 or state.step == cfg.train.steps:
                job.checkpoint(metrics)
        job.finish()
        return job.run_dir
