"""Held-out evaluation of a policy through the agent loop (``relayrl eval``, ``eval.every``).

An evaluation runs every task's episodes exactly as training does (the same agent loop, parser,
env, sandboxes, anti-hack gate and scoring, on the job's engines), sampling with the ``eval``
section's temperature (0 = greedy), and reduces them to:

- ``pass@k`` for k = 1, 2, 4, ... up to ``eval.samples``: the unbiased estimator of the chance
  that at least one of k episodes of a task passes, averaged over tasks (an episode passes when
  its reward reaches ``eval.pass_threshold``);
- the mean reward, turns, response tokens, tool calls, tool errors and format errors per episode,
  and the fraction of episodes cut by a cap (``truncated``).

An episode that could not run (engine or sandbox dead after its retries, env timeout, env bug)
is never counted as a 0: ``relayrl eval`` exits non-zero naming the failure, and during training
the count is logged as ``eval/failed`` with a warning.

``relayrl eval`` writes one JSON line per episode (task, sample, reward, counts, the transcript
of what the agent wrote and saw) so that what a model learnt can be read, not only scored.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from pathlib import Path
from typing import Any, Callable

from relayrl.config import Config, ConfigError, EvalConfig
from relayrl.rollout.agent import EpisodeJob
from relayrl.types import Trajectory

EVAL_DIR = "eval"


class EvalFailed(RuntimeError):
    """Episodes of an evaluation could not run (engine, sandbox, env): the score would be a lie."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k for one task with ``n`` episodes of which ``c`` passed:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", eq. 1), computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` so that large n do
    not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(samples: int) -> list[int]:
    """The k of the pass@k table: 1, 2, 4, ... and ``samples`` itself."""
    ks = {samples}
    k = 1
    while k < samples:
        ks.add(k)
        k *= 2
    return sorted(ks)


def eval_jobs(tasks: list[dict[str, Any]], samples: int, seed: int) -> list[EpisodeJob]:
    """One job per (task, sample); each with its own sampling seed, the same for every
    checkpoint evaluated, so two checkpoints are compared on the same draws."""
    return [EpisodeJob(task, task_index=i, sample_index=s,
                       seed=zlib.crc32(f"eval:{seed}:{task.get('id', i)}:{s}".encode()) & 0x7FFFFFFF)
            for i, task in enumerate(tasks) for s in range(samples)]


def episode_record(job: EpisodeJob, traj: Trajectory, cfg: EvalConfig,
                   decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
    """One line of the per-episode JSONL: the task, the outcome, the counts, and (with
    ``decode``) the transcript from the agent's first token on (prompt left out)."""
    m = traj.metrics
    record: dict[str, Any] = {
        "task_id": job.task.get("id", job.task_index), "task_index": job.task_index, "sample": job.sample_index,
        "reward": traj.reward, "passed": (not traj.failed) and traj.reward >= cfg.pass_threshold,
        "failed": traj.failed, "failure_kind": traj.failure_kind or None,
        "turns": m.get("turns", 0.0), "response_tokens": m.get("response_tokens", 0.0),
        "tool_calls": m.get("env/tool_calls", 0.0), "tool_errors": m.get("env/tool_errors", 0.0),
        "format_errors": m.get("format_errors", 0.0), "truncated": m.get("truncated", 0.0),
    }
    if "family" in job.task:
        record["family"] = job.task["family"]
    if traj.failed:
        record["error"] = traj.error.splitlines()[0] if traj.error else ""
    if decode is not None and traj.sub_traces:
        last = traj.sub_traces[-1]
        first = next((i for i, m in enumerate(last.loss_mask) if m), len(last.tokens))
        record["transcript"] = decode(last.tokens[first:])
    return record


def summarize(records: list[dict[str, Any]], samples: int) -> dict[str, float]:
    """``eval/*`` metrics of an evaluation's episode records (failed episodes excluded from the
    means, counted in ``eval/failed``)."""
    by_task: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task_index"], []).append(r)
    ran = [r for r in records if not r["failed"]]
    out: dict[str, float] = {"eval/tasks": float(len(by_task)), "eval/episodes": float(len(records)),
                             "eval/failed": float(len(records) - len(ran))}
    complete = {t: rs for t, rs in by_task.items() if not any(r["failed"] for r in rs)}
    for k in ks_for(samples):
        per_task = [pass_at_k(len(rs), sum(r["passed"] for r in rs), k) for rs in complete.values() if len(rs) >= k]
        if per_task:
            out[f"eval/pass@{k}"] = sum(per_task) / len(per_task)
    for key in ("reward", "turns", "response_tokens", "tool_calls", "tool_errors", "format_errors", "truncated"):
        if ran:
            out[f"eval/{key}"] = sum(float(r[key]) for r in ran) / len(ran)
    return out


def format_summary(summary: dict[str, float], title: str) -> str:
    """The summary as a two-column table."""
    rows = [(k.removeprefix("eval/"), v) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 12)]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:>10.4f}" if not float(v).is_integer() else f"{k:<{width}}  {int(v):>10d}")
    return "\n".join(lines)


def failure_message(records: list[dict[str, Any]]) -> str:
    failed = [r for r in records if r["failed"]]
    kinds = sorted({r["failure_kind"] or "unknown" for r in failed})
    first = failed[0]
    return (f"{len(failed)} of {len(records)} evaluation episodes could not run ({', '.join(kinds)}); the first, "
            f"task {first['task_id']!r}: {first.get('error') or 'no message'}. Fix the engine / sandbox / env "
            "and evaluate again: a score with episodes missing would not be comparable.")


# ----------------------------------------------------------------------------- relayrl eval


def resolve_checkpoint(path: str | None, fallback: str) -> str:
    """The HF model directory to evaluate: ``path`` itself, its ``policy/`` (a checkpoint step
    directory), or the newest checkpoint's policy of a run directory; ``fallback`` (the
    config's model) when ``path`` is None."""
    if path is None:
        return fallback
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    if (p / "policy" / "config.json").is_file():
        return str(p / "policy")
    steps = sorted((p / "checkpoints").glob("step_*/policy/config.json")) if p.is_dir() else []
    if steps:
        return str(steps[-1].parent)
    raise ConfigError(f"--checkpoint: {path} is not a model directory (no config.json), a checkpoint step "
                      "directory (with policy/) or a run directory with checkpoints/. Give one of those, "
                      "e.g. runs/NAME/checkpoints/step_000020.")


def evaluate_agent(cfg: Config, checkpoint: str | None = None, tasks: str | None = None,
                   samples: int | None = None, max_tasks: int | None = None,
                   out: str | None = None, progress: bool = True) -> tuple[dict[str, float], Path]:
    """``relayrl eval`` in agent mode: start the config's engines on ``checkpoint`` (default
    ``model.path``), run the held-out episodes, write the per-episode JSONL and the summary
    JSON, and return (summary, JSONL path). Raises ``EvalFailed`` when episodes could not run."""
    import ray

    from relayrl.model import resolve_model_path
    from relayrl.rollout.sglang_engine import launch_engines
    from relayrl.rollout.worker import RolloutWorker, make_env_factory

    from .data import load_tasks
    from .job import actor_env, preflight_env

    ev = cfg.eval.model_copy(update={k: v for k, v in (("tasks", tasks), ("samples", samples),
                                                       ("max_tasks", max_tasks)) if v is not None})
    if ev.samples > 1 and ev.temperature == 0:
        raise ConfigError(f"--samples {ev.samples}: greedy episodes (eval.temperature=0) are all the same; "
                          "pass eval.temperature=0.8 (or another value > 0) for pass@k, or --samples 1")
    if cfg.engine.kind == "external" and checkpoint is not None:
        raise ConfigError("--checkpoint: engine.kind=external serves whatever its servers hold; load the "
                          "checkpoint into them, or use engine.kind=cpu / sglang")
    base_model = str(resolve_model_path(cfg.model.path, cfg.model.cache_dir))
    model_path = resolve_checkpoint(checkpoint, base_model)
    env_cfg = cfg.env.model_copy(update={"tasks": ev.tasks if ev.tasks is not None else cfg.env.tasks})
    env = make_env_factory(env_cfg)()
    task_list = load_tasks(env_cfg, type(env), cfg.run.seed)[: ev.max_tasks]
    preflight_env(env)
    jobs = eval_jobs(task_list, ev.samples, ev.seed)

    label = "base" if checkpoint is None else Path(model_path).parent.name if Path(model_path).name == "policy" \
        else Path(model_path).name
    out_path = Path(out) if out else cfg.run.run_dir / EVAL_DIR / f"{label}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": actor_env(cfg)})
    fleet = placement = None
    try:
        if cfg.engine.kind == "sglang":
            from .placement import plan_placement, reserve

            plan = plan_placement("disaggregated", 0, cfg.engine.num_engines, cfg.engine.sglang.tp_size, 1,
                                  cfg.ray.gpus_per_node, cpus_per_bundle=0)
            placement = (plan, reserve(plan))
        fleet = launch_engines(cfg, model_path, str(out_path.parent / "engine_logs"), placement, seed=cfg.run.seed)
        urls = fleet.urls if fleet is not None else list(cfg.engine.urls)
        worker = RolloutWorker(cfg.rollout, env_cfg, model_path, urls, None, cfg.engine.request_timeout_s,
                               cfg.compaction, cfg.antihack, cfg.blackbox, cfg.subagents)
        trajs = asyncio.run(_run_with_progress(worker, jobs, ev, progress, f"eval {label}"))
        decode = lambda ids: worker.chat.tok.decode(ids, skip_special_tokens=False)  # noqa: E731
        records = [episode_record(j, t, ev, decode) for j, t in zip(jobs, trajs, strict=True)]
    finally:
        if fleet is not None:
            fleet.shutdown()
        if placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(placement[1])
        if own_ray:
            ray.shutdown()

    with out_path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = summarize(records, ev.samples)
    meta = {"checkpoint": model_path, "tasks": env_cfg.tasks or f"the built-in tasks of {cfg.env.name}",
            "temperature": ev.temperature, "samples": ev.samples, "episodes": str(out_path)}
    out_path.with_suffix(".summary.json").write_text(json.dumps({**meta, **summary}, indent=2) + "\n")
    if summary["eval/failed"]:
        raise EvalFailed(failure_message(records) + f" The episodes are in {out_path}.")
    return summary, out_path


async def _run_with_progress(worker: Any, jobs: list[EpisodeJob], ev: EvalConfig, progress: bool,
                             title: str) -> list[Trajectory]:
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    passed = [0]
    bar = None
    if progress and sys.stderr.isatty():
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
        task = bar.add_task(title, total=len(jobs), info="")
        bar.start()
    done = [0]

    def on_done(traj: Trajectory) -> None:
        done[0] += 1
        passed[0] += int(not traj.failed and traj.reward >= ev.pass_threshold)
        info = f"passed {passed[0]}/{done[0]}"
        if bar is not None:
            bar.update(task, advance=1, info=info)
        elif progress and (done[0] % max(1, len(jobs) // 10) == 0 or done[0] == len(jobs)):
            print(f"{title}: {done[0]}/{len(jobs)} episodes, {info}", file=sys.stderr, flush=True)

    try:
        return await worker.evaluate(jobs, ev.temperature, ev.top_p, on_done=on_done)
    finally:
        if bar is not None:
            bar.stop()
        await worker.close()


# ----------------------------------------------------------------------------- relayrl eval-diff


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The episode records of an evaluation JSONL (``relayrl eval`` or ``<run_dir>/eval/``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such evaluation file. Give the .jsonl that relayrl eval wrote "
                          "(<run_dir>/eval/<checkpoint>.jsonl or <run_dir>/eval/step_NNNNNN.jsonl).")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {i + 1} is not JSON ({e.msg}); is this an evaluation file?") from None
        if not isinstance(record, dict) or not {"task_id", "task_index", "passed", "reward"} <= set(record):
            raise ConfigError(f"{p}: line {i + 1} is not an episode record of relayrl eval "
                              "(task_id, task_index, passed, reward)")
        records.append(record)
    if not records:
        raise ConfigError(f"{p}: holds no episodes")
    return records


def diff_evals(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """What changed between two evaluations of the same tasks: the headline metrics side by
    side, the tasks that flipped (a task passes when any of its episodes passed), and the pass
    counts per task family where the tasks have one."""
    def passed_tasks(records: list[dict[str, Any]]) -> dict[Any, bool]:
        out: dict[Any, bool] = {}
        for r in records:
            out[r["task_id"]] = out.get(r["task_id"], False) or bool(r["passed"])
        return out

    a, b = passed_tasks(before), passed_tasks(after)
    common = sorted(set(a) & set(b), key=str)
    if not common:
        raise ConfigError("the two evaluations share no task; compare evaluations of the same tasks")
    samples = max(sum(1 for r in records if r["task_id"] == records[0]["task_id"]) for records in (before, after))
    sa, sb = summarize(before, samples), summarize(after, samples)
    lines = [f"{'':<18}{'before':>10}{'after':>10}"]
    for key in ("eval/pass@1", "eval/reward", "eval/response_tokens", "eval/turns", "eval/format_errors",
                "eval/tool_errors", "eval/truncated", "eval/failed"):
        if key in sa or key in sb:
            lines.append(f"{key.removeprefix('eval/'):<18}{sa.get(key, float('nan')):>10.4f}{sb.get(key, float('nan')):>10.4f}")
    gained = [t for t in common if b[t] and not a[t]]
    lost = [t for t in common if a[t] and not b[t]]
    lines.append(f"tasks compared: {len(common)}; passing before {sum(a[t] for t in common)}, after "
                 f"{sum(b[t] for t in common)}; gained {len(gained)}, lost {len(lost)}")
    if gained:
        lines.append("gained: " + ", ".join(map(str, gained)))
    if lost:
        lines.append("lost: " + ", ".join(map(str, lost)))
    family = {r["task_id"]: r["family"] for r in before + after if "family" in r}
    if family:
        lines.append("by family (tasks passing before -> after / tasks):")
        for fam in sorted({family[t] for t in common if t in family}):
            ts = [t for t in common if family.get(t) == fam]
            pa, pb = sum(a[t] for t in ts), sum(b[t] for t in ts)
            if pa or pb:
                lines.append(f"  {fam:<24}{pa:>3} -> {pb:<3}/ {len(ts)}")
    return "\n".join(lines)
