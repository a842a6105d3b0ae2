"""A training job's parts, built once and torn down cleanly: run directory, Ray, engines,
buffer, rollout workers, trainers, checkpoints, metrics. The driver loop (``rl/driver.py``)
only calls the methods here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
import torch

from relayrl.config import Config, ConfigError, dump_config
from relayrl.metrics import MetricsLogger
from relayrl.model import resolve_model_path
from relayrl.rollout.buffer import Buffer
from relayrl.rollout.compaction import make_compactor
from relayrl.rollout.client import HttpEngineClient
from relayrl.rollout.sglang_engine import launch_engines
from relayrl.rollout.worker import RolloutWorkerActor, make_env_factory, make_parser
from relayrl.types import SubTrace, Trajectory

from .checkpoint import CheckpointManager, DriverState
from .data import load_tasks
from .ppo import make_policy_loss_fn, make_value_loss_fn
from .rollouts import RolloutScheduler
from .trainer_actor import TrainerGroup

BufferActor = ray.remote(Buffer)


async def _update_engines(urls: list[str], path: str, version: int, timeout_s: float) -> None:
    client = HttpEngineClient(urls, timeout_s=timeout_s)
    try:
        await client.update_weights(path, version)
    finally:
        await client.close()


async def _engine_version(urls: list[str], timeout_s: float) -> int:
    client = HttpEngineClient(urls, timeout_s=timeout_s)
    try:
        return await client.weight_version()
    finally:
        await client.close()


def rollout_metrics(groups: list[list[Trajectory]], subs: list[SubTrace]) -> dict[str, float]:
    trajs = [t for g in groups for t in g]
    ok = [t for t in trajs if not t.failed]
    out: dict[str, float] = {
        "rollout/trajectories": float(len(trajs)),
        "rollout/failed": float(len(trajs) - len(ok)),
        **{f"rollout/failed_{kind}": float(sum(t.failure_kind == kind for t in trajs))
           for kind in ("engine", "sandbox", "env_timeout", "env_error", "agent")},
        "rollout/sub_traces": float(len(subs)),
    }
    if ok:
        rewards = torch.tensor([t.reward for t in ok])
        out["reward/mean"] = float(rewards.mean())
        out["reward/std"] = float(rewards.std()) if len(ok) > 1 else 0.0
        out["reward/max"] = float(rewards.max())
        keys = sorted({k for t in ok for k in t.metrics})
        for k in keys:
            vals = [t.metrics[k] for t in ok if k in t.metrics]
            out[k if k.startswith("time/") else f"rollout/{k}"] = sum(vals) / len(vals)
    if subs:
        out["rollout/response_tokens_per_subtrace"] = sum(s.num_response_tokens for s in subs) / len(subs)
        out["rollout/tokens_per_subtrace"] = sum(len(s.tokens) for s in subs) / len(subs)
        versions = [s.weight_version for s in subs]
        out["rollout/min_weight_version"] = float(min(versions))
    return out


def check_megatron_available(model_path: str | None = None, tp: int = 1, pp: int = 1, cp: int = 1) -> None:
    """trainer.backend=megatron: megatron-core installed, a device it can run on (CUDA GPUs with
    Transformer Engine for context parallel, ``cp`` > 1), and a model it converts at this
    tensor-parallel size and splits into this many pipeline stages; or a ConfigError naming the key."""
    import importlib.util

    if importlib.util.find_spec("megatron.core") is None:
        raise ConfigError("trainer.backend: 'megatron' needs megatron-core; install the extra with "
                          "pip install -c constraints.txt 'relayrl[megatron]' (or use trainer.backend=deepspeed)")
    from .megatron_backend import _require_device, cp_needs_te

    if cp > 1:
        import torch

        if not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None):
            raise ConfigError(cp_needs_te(cp))

    try:
        _require_device()
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if model_path is not None:
        from transformers import AutoConfig

        from .megatron_convert import UnsupportedModel, arch_from_hf_config, check_pp, check_tp

        try:
            spec = arch_from_hf_config(AutoConfig.from_pretrained(model_path))
        except UnsupportedModel as e:
            raise ConfigError(f"model.path: the megatron backend cannot convert {model_path}: {e}. "
                              "Use trainer.backend=deepspeed for it.") from None
        try:
            check_tp(spec, tp)
            check_pp(spec, pp)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def preflight_env(env: Any) -> None:
    """Run the env's optional ``preflight()`` (does its sandbox work, is it isolated?) before
    anything expensive starts: a problem is a ConfigError, a warning is printed loudly."""
    preflight = getattr(env, "preflight", None)
    if preflight is None:
        return
    try:
        warnings = asyncio.run(preflight())
    except ValueError as e:
        raise ConfigError(f"env: {e}") from None
    for warning in warnings:
        print(f"\n*** relayrl WARNING: {warning} ***\n", file=sys.stderr, flush=True)


MALLOC_TUNABLES = {"glibc.malloc.mmap_threshold": str(2**30), "glibc.malloc.trim_threshold": str(2**30)}
"""glibc malloc settings of the actors (``ray.keep_freed_memory``). By default glibc serves a
large block with its own ``mmap`` and unmaps it on ``free`` (above a threshold that adapts, up to
32 MiB), and returns the top of the heap to the OS once 128 KiB or more of it is free: the
logits, activations and gradients of every micro-batch then fault their pages in afresh (1.5-2
million minor faults, 3-6 s of system time, in one SmolLM2 train step of 32 sequences). Blocks
up to 1 GiB from the heap, and a heap that keeps up to 1 GiB free, make those pages reused."""


def glibc_tunables(existing: str | None, tunables: dict[str, str] = MALLOC_TUNABLES) -> str:
    """A ``GLIBC_TUNABLES`` value: ``existing`` (``key=value`` pairs joined by ``:``) plus each of
    ``tunables`` that it does not set already (the user's own value wins)."""
    items = [kv for kv in (existing or "").split(":") if kv]
    have = {kv.split("=", 1)[0] for kv in items}
    items += [f"{k}={v}" for k, v in tunables.items() if k not in have]
    return ":".join(items)


def actor_env(cfg: Config) -> dict[str, str]:
    """Environment of the job's actors: no per-file progress bars or advisory warnings from
    libraries in the middle of relayrl's own progress display, and (``ray.keep_freed_memory``)
    ``MALLOC_TUNABLES``. Variables the user has set keep their values."""
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed warn that it guessed
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    if cfg.ray.keep_freed_memory:
        env["GLIBC_TUNABLES"] = glibc_tunables(os.environ.get("GLIBC_TUNABLES"))
    return env


def _weights_root(run_name: str) -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(dir=base, prefix=f"relayrl-{run_name}-"))


class Job:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.run_dir
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_checkpoints)
        self.state = DriverState()
        self._audit: Any = None
        self._engine_actors: list[Any] = []
        self._weights_dir: Path | None = None
        self._handoff_version: int | None = None  # the version in the hand-off directory
        self.logger: MetricsLogger | None = None
        self.reference: TrainerGroup | None = None
        self.critic: TrainerGroup | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def start(cls, cfg: Config) -> Iterator["Job"]:
        job = cls(cfg)
        try:
            job._check_plugins()
            job._prepare_run_dir()
            job._start_ray()
            job._build()
            yield job
        finally:
            job.close()

    #: Whether the job has teachers (``opd.distill.DistillJob``): the driver then calls
    #: ``teacher_score`` and ``distill_advantages``.
    distills = False

    def needs_critic(self) -> bool:
        """Whether the job trains a critic (GAE does; a subclass such as distillation may not)."""
        return self.cfg.algorithm.estimator == "gae"

    def uses_task_advantage(self) -> bool:
        """Whether the env's reward becomes an advantage (GAE or group-relative)."""
        return True

    def actor_start_step(self) -> int:
        """The first step that trains the actor: after the critic's warm-up, if it has one."""
        return self.cfg.algorithm.critic_warmup_steps if self.needs_critic() else 0

    def finish(self) -> None:
        """After the last step (a subclass writes its outputs here)."""

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        latest = self.ckpt.latest()
        if cfg.run.resume:
            if latest is None:
                raise ConfigError(f"run.resume: no checkpoint in {self.run_dir}/checkpoints to resume "
                                  "from; start without run.resume=true")
            self.state = CheckpointManager.load_state(latest)
        elif latest is not None:
            raise ConfigError(f"run.name: {self.run_dir} already holds checkpoints. Resume it with "
                              "run.resume=true, or pick another run.name / run.output_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))

    def _check_plugins(self) -> None:
        """Resolve every user-named plug-in before anything expensive starts."""
        self.model_path = str(resolve_model_path(self.cfg.model.path, self.cfg.model.cache_dir))
        self.env_factory = make_env_factory(self.cfg.env, self.cfg.eval)
        make_parser(self.cfg.rollout.parser)
        if self.cfg.subagents.enabled and self.cfg.subagents.parser:
            make_parser(self.cfg.subagents.parser, "subagents.parser")
        make_compactor(self.cfg.compaction)
        if self.cfg.blackbox.enabled:
            from relayrl.rollout.blackbox import check_blackbox_config

            try:
                check_blackbox_config(self.cfg.blackbox)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.cfg.antihack.enabled:
            from relayrl.antihack import RulePackError, make_rule_stage

            try:
                make_rule_stage(self.cfg.antihack)
            except RulePackError as e:
                raise ConfigError(f"antihack.rule_packs: {e}") from None
        try:
            env = self.env_factory()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"env.kwargs: the environment {self.cfg.env.name!r} rejected its arguments "
                              f"{self.cfg.env.kwargs}: {e}. Fix env.kwargs.") from None
        if self.cfg.blackbox.enabled:
            from relayrl.rollout.blackbox import check_blackbox_env

            try:
                check_blackbox_env(env)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.tasks = load_tasks(self.cfg.env, type(env), self.cfg.run.seed)
        self.eval_tasks: list[dict[str, Any]] = []
        if self.cfg.eval.every > 0:
            eval_env = self.cfg.env.model_copy(update={"tasks": self.cfg.eval.tasks})
            self.eval_tasks = load_tasks(eval_env, type(env), self.cfg.run.seed)[: self.cfg.eval.max_tasks]
        preflight_env(env)
        if self.cfg.engine.router and self.cfg.engine.kind != "external":
            from relayrl.rollout.sglang_engine import router_command

            if not Path(router_command([], "127.0.0.1", 0)[0]).is_file():
                raise ConfigError("engine.router: the sglang-router binary is not installed; install it with "
                                  "pip install -c constraints.txt 'relayrl[sglang]' or set engine.router=false")
        if self.cfg.trainer.backend == "megatron":
            m = self.cfg.trainer.megatron
            check_megatron_available(self.model_path, m.tensor_parallel_size, m.pipeline_parallel_size,
                                     m.context_parallel_size)

    def _start_ray(self) -> None:
        if ray.is_initialized():
            self._own_ray = False
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                  "configure_logging": False, "runtime_env": {"env_vars": actor_env(self.cfg)}}
        if self.cfg.ray.address:
            kwargs["address"] = self.cfg.ray.address
        elif self.cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = self.cfg.ray.num_cpus
        ray.init(**kwargs)
        self._own_ray = True

    def _build(self) -> None:
        cfg = self.cfg
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.logger = MetricsLogger(self.run_dir, cfg.logging, cfg.run.name,
                                    cfg.model_dump(mode="json"), resume=cfg.run.resume,
                                    resume_step=self.state.step, total_steps=cfg.train.steps)

        # On one box Ray's CPU accounting would serialise engine and trainers, which take turns
        # anyway; CPU engines reserve no CPU and set their own thread counts instead. GPU jobs
        # (SGLang engines) place trainers and engines by ray.placement (rl/placement.py).
        self._placement = self._reserve_gpus() if cfg.engine.kind == "sglang" else None
        self.fleet = launch_engines(cfg, self.model_path, str(self.run_dir / "engine_logs"),
                                    self._placement, seed=cfg.run.seed)
        urls = self.fleet.urls if self.fleet is not None else list(cfg.engine.urls)
        self.engine_urls = self.fleet.update_urls if self.fleet is not None else urls
        self._last_health_check = time.monotonic()
        self._engines_asleep = False

        self.buffer = BufferActor.options(num_cpus=0).remote(
            str(self.run_dir), cfg.rollout.group_size, cfg.rollout.max_weight_lag)
        def new_worker(_: int = 0) -> Any:
            return RolloutWorkerActor.options(num_cpus=0).remote(
                cfg.rollout, cfg.env, self.model_path, urls, self.buffer, cfg.engine.request_timeout_s,
                cfg.compaction, cfg.antihack, cfg.blackbox, cfg.subagents, cfg.eval)

        self._new_worker = new_worker
        self.workers = [new_worker() for _ in range(cfg.rollout.num_workers)]

        tc = cfg.trainer
        place: dict[str, Any] = {"num_cpus_per_rank": 0, "num_threads": tc.num_threads or os.cpu_count()}
        if self._placement is not None:
            from .placement import strategy

            plan, pg = self._placement
            place.update(num_gpus_per_rank=plan.trainer_gpus,
                         scheduling=[strategy(pg, b) for b in plan.trainer_bundle])
        self.policy = TrainerGroup("policy", self.model_path, tc, tc.policy, cfg.model.dtype, seed=cfg.run.seed, **place)
        if self.needs_critic():
            critic_path = str(resolve_model_path(cfg.model.critic_path, cfg.model.cache_dir)) \
                if cfg.model.critic_path else self.model_path
            self.critic = TrainerGroup("critic", critic_path, tc, tc.critic, cfg.model.dtype,
                                       seed=cfg.run.seed + 1, **place)
        if cfg.algorithm.kl_coef > 0:
            self.reference = TrainerGroup("reference", self.model_path, tc, tc.policy, cfg.model.dtype,
                                          seed=cfg.run.seed, **place)

        held: set[str] = set()
        if cfg.run.resume:
            latest = self.ckpt.latest()
            assert latest is not None
            self.policy.load(str(latest / "policy"))
            if self.critic is not None:
                self.critic.load(str(latest / "critic"))
            ray.get(self.buffer.restore.remote(self.state.consumed))
            held = set(ray.get(self.buffer.known_trajectory_ids.remote()))
        self.rollouts = RolloutScheduler(cfg, self.workers, self.buffer, self.tasks, self.state.slot_cursor,
                                         respawn_worker=self._new_worker, on_wait=self.supervise_engines,
                                         on_collected=self._engines_sleep if self._colocated() else None)
        if cfg.run.resume:
            self.rollouts.resume(set(self.state.consumed), held)
        self._weights_dir = _weights_root(cfg.run.name)
        # Engines start from the checkpoint's own files; after a resume they need the resumed weights.
        if self.state.weight_version > 0:
            self.sync_weights(self.state.weight_version)

    # -- the step's operations -----------------------------------------------------------------

    def old_logprobs_from_forward(self) -> bool:
        """Whether the policy loss takes its old logprobs from its own training forward (detached)
        instead of a separate pass before the update (``algorithm.old_logprobs``)."""
        alg = self.cfg.algorithm
        return (alg.old_logprobs == "auto" and alg.ppo_epochs == 1 and alg.num_minibatches == 1
                and not self.distills)

    def score(self, samples: list[dict[str, torch.Tensor]]) -> None:
        """Old logprobs (recomputed by the trainer, or the engine's, or none needed: see
        ``old_logprobs_from_forward``) and reference logprobs."""
        temp = self.cfg.rollout.temperature
        if self.cfg.algorithm.old_logprobs == "engine":
            for s in samples:
                s["old_logprobs"] = s["rollout_logprobs"] * s["loss_mask"]
        elif not self.old_logprobs_from_forward():
            for s, lp in zip(samples, self.policy.forward_logprobs(samples, temp), strict=True):
                s["old_logprobs"] = lp * s["loss_mask"]
        if self.reference is not None:
            for s, lp in zip(samples, self.reference.forward_logprobs(samples, temp), strict=True):
                s["ref_logprobs"] = lp * s["loss_mask"]

    def update(self, trainer: TrainerGroup, samples: list[dict[str, torch.Tensor]], step: int,
               role: str) -> dict[str, float]:
        """ppo_epochs passes over the batch in num_minibatches optimizer steps each."""
        alg = self.cfg.algorithm
        make = make_policy_loss_fn if role == "policy" else make_value_loss_fn
        extra = {"old_from_forward": self.old_logprobs_from_forward()} if role == "policy" else {}
        mask_key = "loss_mask" if role == "policy" else "value_mask"
        g = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + step)
        totals: dict[str, float] = {}
        n_updates = 0
        for _ in range(alg.ppo_epochs):
            perm = torch.randperm(len(samples), generator=g).tolist() if alg.num_minibatches > 1 else list(range(len(samples)))
            for k in range(alg.num_minibatches):
                mb = [samples[i] for i in perm[k::alg.num_minibatches]]
                if not mb:
                    continue
                num_tokens = int(sum(int(s[mask_key].sum()) for s in mb))
                loss_fn = make(alg, num_tokens=max(num_tokens, 1), num_sequences=len(mb), **extra)
                out = trainer.train_step(mb, loss_fn, self.cfg.rollout.temperature)
                for key, v in out.items():
                    totals[key] = totals.get(key, 0.0) + float(v)
                n_updates += 1
        prefix = "actor" if role == "policy" else "critic"
        return {f"{prefix}/{k}": v / max(n_updates, 1) for k, v in totals.items()}

    def sync_weights(self, version: int) -> None:
        """Trainer -> every engine, by ``engine.weight_sync``: ``disk`` writes the policy's weights
        once and the engines load them; ``distributed`` broadcasts them from the trainer's rank 0;
        ``tensor`` hands colocated engines CUDA IPC handles. Dead engines are restarted first."""
        assert self._weights_dir is not None
        e = self.cfg.engine
        if self._colocated() and self._engines_asleep:
            self.fleet.resume_memory()
            self._engines_asleep = False
        if e.weight_sync in ("distributed", "tensor") and self.fleet is not None:
            bucket = e.weight_sync_bucket_mb * 2**20
            for attempt in range(2):
                # Dead engines first: a broadcast would wait for them. One that dies during the
                # sync fails it; it is then restarted (from the policy's weights, exported) and
                # the sync is made once more with a new group.
                self.supervise_engines(force=True)
                try:
                    if e.weight_sync == "distributed":
                        self.policy.sync_weights_distributed(self.engine_urls, self.fleet.engine_tp,
                                                             "nccl" if e.kind == "sglang" else "gloo", version,
                                                             bucket, e.request_timeout_s)
                    else:
                        self.policy.sync_weights_tensor(self.engine_urls, self.fleet.engine_tp, version, bucket,
                                                        e.request_timeout_s)
                    break
                except ray.exceptions.RayTaskError:
                    if attempt == 1 or not self.fleet.dead():
                        raise
            self._engine_version = asyncio.run(_engine_version(self.engine_urls, e.request_timeout_s))
            return
        self._export_handoff(version)
        self.supervise_engines(force=True)  # a restarted engine loads this export itself
        asyncio.run(_update_engines(self.engine_urls, str(self._handoff_path()), version, e.request_timeout_s))
        if self.fleet is not None:
            self._engine_version = asyncio.run(_engine_version(self.engine_urls, e.request_timeout_s))

    def _handoff_path(self) -> Path:
        assert self._weights_dir is not None
        return self._weights_dir / "policy"

    def _export_handoff(self, version: int) -> None:
        """The policy's weights of ``version`` written for the engines to load (a hand-off, not a
        checkpoint). One directory for every version, rewritten in place once it exists: the
        engines read it only when told to, after this returns (``sync_weights``), or when one is
        relaunched from it (``supervise_engines``, also from the driver's thread)."""
        self._handoff_version = None  # a failed write leaves no version claimed
        self.policy.export_hf(str(self._handoff_path()), durable=False)
        self._handoff_version = version

    def _colocated(self) -> bool:
        return self.cfg.engine.kind == "sglang" and self.cfg.ray.placement == "colocated" and self.fleet is not None

    def _engines_sleep(self) -> None:
        """Colocated: the step's rollouts are in; the engines free the GPUs for the trainer until
        the weight sync (SGLang's memory saver; GPU only, not run on the CPU machine)."""
        self.fleet.release_memory()
        self._engines_asleep = True

    def _reserve_gpus(self) -> tuple[Any, Any]:
        from .placement import plan_placement, reserve

        cfg = self.cfg
        roles = 1 + int(self.needs_critic()) + int(cfg.algorithm.kl_coef > 0)
        try:
            plan = plan_placement(cfg.ray.placement, cfg.trainer.world_size, cfg.engine.num_engines,
                                  cfg.engine.sglang.tp_size, roles, cfg.ray.gpus_per_node, cpus_per_bundle=0)
            return plan, reserve(plan)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"engine.kind=sglang: {err} (on a machine without GPUs use engine.kind=cpu, or "
                              "engine.kind=external with engine.urls)") from None

    def supervise_engines(self, force: bool = False) -> list[int]:
        """Restart dead engines with the current weights (probed every engine.health_check_interval_s).

        The current weights are the policy's (the driver is not training while it waits for
        rollouts), exported to disk for the relaunch; the weight-sync group is remade next sync."""
        if self.fleet is None:
            return []
        now = time.monotonic()
        if not force and now - self._last_health_check < self.cfg.engine.health_check_interval_s:
            return []
        self._last_health_check = now
        if not self.fleet.dead():
            return []
        version = self.state.weight_version
        path = None
        if version > 0:
            if self._handoff_version != version:
                self._export_handoff(version)
            path = str(self._handoff_path())
        restarted = self.fleet.supervise(path, version if version > 0 else None)
        self.engine_urls = self.fleet.update_urls
        if restarted and self.cfg.engine.weight_sync == "distributed":
            self.policy.reset_weight_sender()
        return restarted

    def eval_due(self, step: int) -> bool:
        """Whether the held-out evaluation runs after ``step`` (0: the initial weights)."""
        ev = self.cfg.eval
        if ev.every <= 0:
            return False
        if step == 0:
            return ev.at_start
        return step % ev.every == 0 or step == self.cfg.train.steps

    def evaluate(self, step: int) -> dict[str, float]:
        """Run the held-out tasks (``eval`` section) on the engines' current weights, spread over
        the rollout workers; write the episodes to ``<run_dir>/eval/step_NNNNNN.jsonl`` and
        return the ``eval/*`` metrics. Episodes that could not run are counted, not scored."""
        from .evaluation import EVAL_DIR, episode_record, eval_jobs, failure_message, summarize

        ev = self.cfg.eval
        jobs = eval_jobs(self.eval_tasks, ev.samples, ev.seed)
        n = len(self.workers)
        chunks = [jobs[i::n] for i in range(n)]
        results = ray.get([w.evaluate.remote(c, ev.temperature, ev.top_p)
                           for w, c in zip(self.workers, chunks, strict=True) if c])
        by_id = {t.trajectory_id: t for ts in results for t in ts}
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        records = [episode_record(j, by_id[j.trajectory_id], ev, decode) for j in jobs]
        out = self.run_dir / EVAL_DIR / f"step_{step:06d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        summary = summarize(records, ev.samples)
        if summary["eval/failed"] and self.logger is not None:
            self.logger.message(f"*** relayrl WARNING: evaluation after step {step}: {failure_message(records)}")
        return summary

    def record_verdicts(self, step: int, groups: list[list[Trajectory]]) -> dict[str, float]:
        """Append the step's anti-hack verdicts to the audit log; their counts as metrics."""
        if not self.cfg.antihack.enabled:
            return {}
        from relayrl.antihack.audit import AuditLog, antihack_metrics

        if self._audit is None:
            self._audit = AuditLog(self.run_dir, resume_step=self.state.step if self.cfg.run.resume else None)
        trajs = [t for g in groups for t in g]
        self._audit.write(step, trajs)
        return antihack_metrics(trajs)

    def throughput(self, subs: list[SubTrace], seconds: float) -> dict[str, float]:
        tokens = sum(len(s.tokens) for s in subs)
        response = sum(s.num_response_tokens for s in subs)
        return {"perf/step_time": seconds, "perf/train_tokens_per_s": tokens / max(seconds, 1e-9),
                "perf/response_tokens": float(response)}

    def buffer_stats(self) -> dict[str, float]:
        """The buffer's counters, and the run's fault counters (restarted workers and engines)."""
        out = {k: float(v) for k, v in ray.get(self.buffer.stats.remote()).items()}
        out["rollout/worker_restarts"] = float(self.rollouts.worker_restarts)
        out["engine/restarts"] = float(self.fleet.restarts if self.fleet is not None else 0)
        if getattr(self, "_engine_version", None) is not None:
            out["engine/min_weight_version"] = float(self._engine_version)  # the oldest server's, after the sync
        return out

    def log(self, step: int, metrics: dict[str, float]) -> None:
        assert self.logger is not None
        self.logger.add_rollouts(int(metrics.get("rollout/trajectories", 0)))
        self.logger.log(step, metrics)

    def checkpoint(self, metrics: dict[str, float]) -> Path:
        self.state.consumed = ray.get(self.buffer.consumed_ids.remote())
        self.state.metrics = metrics
        writers = {"policy": self.policy.save}
        if self.critic is not None:
            writers["critic"] = self.critic.save
        return self.ckpt.save(self.state, writers)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None
        for group in (getattr(self, "policy", None), self.critic, self.reference):
            if group is not None:
                try:
                    group.shutdown()
                except Exception:
                    pass
        if getattr(self, "fleet", None) is not None:
            self.fleet.shutdown()
            self.fleet = None
        if getattr(self, "_placement", None) is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._placement[1])
            except Exception:
                pass
            self._placement = None
        for actor in self._engine_actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
        if getattr(self, "_own_ray", False) and ray.is_initialized():
            ray.shutdown()


def write_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(metrics, indent=2))
