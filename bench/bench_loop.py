"""Benchmark of the training loop: where a step's time goes, and relayrl against a peer.

Prints figures; never asserts a time (a shared 2-core CPU cannot promise one).

1. **loop**: a critic-PPO job (``estimator: gae``) on SmolLM2-135M-Instruct and the toy env;
   per step, the seconds of generate, score, values, train critic, train actor and weight
   sync, and the train tokens/s, all read back from ``<run_dir>/metrics.jsonl``.
2. **peers**: one single-turn workload run twice, one after the other, never concurrently:
   relayrl's ``grpo`` estimator, then TRL's ``GRPOTrainer``. Same model, same prompts (the
   ``toy_echo`` tasks), same group size, sampling length, prompts per step, steps, learning
   rate, reward, clip range, loss reduction and torch thread count.

Throughput of a peer = (prompt + completion tokens of every trajectory trained on) / (wall
time of the training steps). The step wall time runs from the start of a step (generation
included) to the end of its optimizer update (relayrl: also the weight sync to the engine).
Excluded, and printed separately as set-up: interpreter start and imports, Ray start, engine
launch, model and tokenizer loading, optimizer / DeepSpeed construction, checkpointing after
the last step, teardown. Each run is a fresh subprocess, so neither inherits the other's
warm caches, threads or Ray instance.

    .venv/bin/python bench/bench_loop.py --quick           # 2 steps, 4 prompts x 4, 32 tokens
    .venv/bin/python bench/bench_loop.py                   # 4 steps, 8 prompts x 4, 64 tokens
    .venv/bin/python bench/bench_loop.py --only trl        # one part: loop | peers | trl | relayrl

See ``bench/README.md`` for how to read the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# relayrl's ChatFormat stops a turn at eos, <|im_end|>, <|eot_id|> and <|endoftext|> when the
# tokenizer has them; TRL stops only at the model's generation_config eos ids. The TRL run is
# given the same stop set so that neither side samples longer completions than the other for
# the same policy. (For SmolLM2 both end up with [2] = <|im_end|>: its <|endoftext|> is the
# unknown token, which ChatFormat skips, and so does this file.)
STOP_TOKEN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


@dataclass(frozen=True)
class Workload:
    """The size of one benchmark run; both peers get the same one.

    steps: training steps (each: generate, score, one optimizer step).
    prompts: prompts (tasks) per step.
    group: completions sampled per prompt (relayrl ``rollout.group_size``, TRL ``num_generations``).
    max_new_tokens: sampling length cap (relayrl ``rollout.max_new_tokens``, TRL ``max_completion_length``).
    lr: AdamW learning rate of the policy, constant.
    threads: torch intra-op threads of every process that runs the model.
    micro_batch: sequences per forward/backward; gradients accumulate to one optimizer step per step.
    seed: seed of both runs.
    model: relayrl ``model.path`` (``smollm2`` = SmolLM2-135M-Instruct, cached as safetensors).
    """

    steps: int
    prompts: int
    group: int
    max_new_tokens: int
    lr: float = 1e-6
    threads: int = 2
    micro_batch: int = 4
    seed: int = 0
    model: str = "smollm2"

    @property
    def sequences_per_step(self) -> int:
        return self.prompts * self.group


QUICK = Workload(steps=2, prompts=4, group=4, max_new_tokens=32)
DEFAULT = Workload(steps=4, prompts=8, group=4, max_new_tokens=64)


# ---------------------------------------------------------------------------------------------
# relayrl configs: the loop-breakdown job (gae) and the peer-comparison job (grpo)
# ---------------------------------------------------------------------------------------------


def _common_overrides(w: Workload, name: str, output_dir: str) -> list[str]:
    seqs = w.sequences_per_step
    return [
        f"run.name={name}",
        f"run.output_dir={output_dir}",
        f"run.seed={w.seed}",
        f"model.path={w.model}",
        "model.dtype=float32",
        # Logical CPUs of the local Ray instance (relayrl's CPU actors reserve none of them).
        "ray.num_cpus=4",
        "engine.kind=cpu",
        "engine.num_engines=1",
        f"engine.num_threads={w.threads}", f"trainer.num_threads={w.threads}",
        f"engine.max_batch_size={seqs}",  # the whole step's batch decodes together, as in TRL's generate
        "engine.max_seq_len=1024",
        "rollout.num_workers=1",
        f"rollout.episodes_per_worker={seqs}",
        f"rollout.max_new_tokens={w.max_new_tokens}",
        "rollout.max_context_tokens=1024",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.max_weight_lag=0",  # on-policy: generation waits for training, as in TRL
        "algorithm.clip_low=0.2",
        "algorithm.clip_high=0.28",
        "algorithm.kl_coef=0.0",
        "algorithm.entropy_coef=0.0",
        "algorithm.loss_reduction=token_mean",
        "algorithm.ppo_epochs=1",
        "algorithm.num_minibatches=1",
        "algorithm.critic_warmup_steps=0",
        f"trainer.micro_batch_size={w.micro_batch}",
        f"trainer.policy.lr={w.lr}",
        "trainer.policy.weight_decay=0.0",
        "trainer.policy.grad_clip=1.0",
        "trainer.policy.warmup_steps=0",
        "trainer.gradient_checkpointing=false",
        f"train.steps={w.steps}",
        f"train.save_every={w.steps}",
        "train.keep_checkpoints=1",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]


def loop_overrides(w: Workload, output_dir: str) -> list[str]:
    """Critic PPO on the multi-turn toy env (as configs/quickstart.yaml), one sequence per task."""
    return _common_overrides(w, "bench-loop-gae", output_dir) + [
        "algorithm.estimator=gae",
        "env.name=toy_echo",
        "env.kwargs.num_turns=2",
        "rollout.parser=hermes",
        "rollout.max_turns=3",
        f"rollout.tasks_per_step={w.sequences_per_step}",
        "rollout.group_size=1",
    ]


def grpo_overrides(w: Workload, output_dir: str) -> list[str]:
    """The single-turn peer workload: toy_echo with one turn, the reply is the answer."""
    return _common_overrides(w, "bench-peer-grpo", output_dir) + [
        "algorithm.estimator=grpo",
        "algorithm.grpo_normalize_std=true",
        "env.name=toy_echo",
        "env.kwargs.num_turns=1",
        "rollout.parser=plain",
        "rollout.max_turns=1",
        f"rollout.tasks_per_step={w.prompts}",
        f"rollout.group_size={w.group}",
    ]


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess and writes one JSON result
# ---------------------------------------------------------------------------------------------


def _pin_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker: every BLAS / OpenMP pool sized to ``threads``. Ray actors
    inherit it, but a relayrl actor may set its own torch thread count over it."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the job wrote no metrics")
    # One flat object per step: {"step": k, "time/generate": ..., ...} (relayrl/metrics.py).
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _relayrl_step_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step figures of a relayrl job from its metrics rows."""
    steps = []
    for i, m in enumerate(metrics):
        if "perf/step_time" not in m:
            continue
        n_subs = float(m.get("rollout/sub_traces", 0.0))
        tokens = float(m.get("rollout/tokens_per_subtrace", 0.0)) * n_subs
        response = float(m.get("perf/response_tokens", 0.0))
        steps.append({
            "step": int(m.get("step", i + 1)),
            "wall_s": float(m["perf/step_time"]),
            "generate_s": float(m.get("time/generate", math.nan)),
            "score_s": float(m.get("time/score", math.nan)),
            "values_s": float(m.get("time/values", math.nan)),
            "train_critic_s": float(m.get("time/train_critic", math.nan)),
            "train_actor_s": float(m.get("time/train_actor", math.nan)),
            "weight_sync_s": float(m.get("time/weight_sync", math.nan)),
            "sequences": n_subs,
            "tokens": round(tokens),
            "completion_tokens": round(response),
            "prompt_tokens": round(tokens - response),
            "train_tokens_per_s": float(m.get("perf/train_tokens_per_s", math.nan)),
            "reward": float(m.get("reward/mean", math.nan)),
        })
    return steps


def worker_relayrl(w: Workload, estimator: str, result: Path, extra: list[str], workdir: Path) -> None:
    t_start = time.perf_counter()
    _pin_threads(w.threads)
    import torch

    from relayrl.config import dump_config, load_config
    from relayrl.rl.driver import train

    overrides = (loop_overrides if estimator == "gae" else grpo_overrides)(w, str(workdir)) + extra
    cfg = load_config(None, overrides)
    run_dir = train(cfg)
    t_total = time.perf_counter() - t_start
    metrics = _relayrl_step_rows(_read_metrics(Path(run_dir)))
    result.write_text(json.dumps({
        "name": f"relayrl ({estimator})",
        "run_dir": str(run_dir),
        "config": dump_config(cfg),
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "process_s": t_total,
        "excluded_s": t_total - sum(s["wall_s"] for s in metrics),
        "steps": metrics,
    }))


def _echo_reward(completions: list[Any], target: list[str], **_: Any) -> list[float]:
    """1.0 if the first word of the completion is the target word, else 0.0: the toy_echo
    reward of a one-turn episode read through relayrl's ``plain`` parser (``text.strip()``,
    first whitespace-separated word)."""
    rewards = []
    for completion, word in zip(completions, target, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        words = text.strip().split()
        rewards.append(1.0 if words and words[0] == word else 0.0)
    return rewards


def echo_prompts(seed: int) -> list[dict[str, Any]]:
    """The toy_echo one-turn tasks as a conversational prompt dataset (what relayrl's
    ``ToyEchoEnv.reset`` sends for ``num_turns=1``)."""
    from relayrl.envs.toy import ToyEchoEnv

    return [
        {"prompt": [{"role": "system", "content": ToyEchoEnv.DEFAULT_SYSTEM},
                    {"role": "user", "content": f"say {task['targets'][0]}"}],
         "target": task["targets"][0]}
        for task in ToyEchoEnv.default_tasks(seed=seed, num_turns=1)
    ]


def worker_trl(w: Workload, result: Path, workdir: Path) -> None:
    t_start = time.perf_counter()
    _pin_threads(w.threads)
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from relayrl.model import resolve_model_path

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, from the end of the previous one (the first from
        the start of the epoch, after the trainer's set-up)."""

        def __init__(self) -> None:
            self.last: float | None = None
            self.walls: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            assert self.last is not None
            self.walls.append(now - self.last)
            self.last = now

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that records, per generation batch, the time of generation + reward +
        advantages and the tokens it produced (its own masks: no padding counted)."""

        generations: list[dict[str, float]]

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.generations.append({
                "generate_s": time.perf_counter() - t0,
                "prompt_tokens": int(out["prompt_mask"].sum()),
                "completion_tokens": int(out["completion_mask"].sum()),
                "sequences": int(out["completion_mask"].shape[0]),
                "reward": float(self._metrics["train"]["reward"][-1]) if self._metrics["train"].get("reward") else math.nan,
            })
            return out

    seqs = w.sequences_per_step
    micro = math.gcd(w.micro_batch, seqs)
    model_path = str(resolve_model_path(w.model))
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    stop_ids = sorted({
        tid for name in STOP_TOKEN_NAMES
        if isinstance(tid := tokenizer.convert_tokens_to_ids(name), int) and tid >= 0
        and tid != tokenizer.unk_token_id
    } | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    model.generation_config.eos_token_id = stop_ids
    load_s = time.perf_counter() - t_load

    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=w.seed,
        dataloader_num_workers=0,
        max_steps=w.steps,
        # One generation batch of prompts x group per step, trained as micro-batches that
        # accumulate into one optimizer step (as relayrl's micro_batch_size).
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=seqs // micro,
        num_generations=w.group,
        max_completion_length=w.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        beta=0.0,  # no reference model (relayrl kl_coef 0)
        num_iterations=1,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",  # token mean over the global batch = relayrl's token_mean
        scale_rewards="group",  # = relayrl grpo_normalize_std
        mask_truncated_completions=False,
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=_echo_reward,
        args=args,
        train_dataset=Dataset.from_list(echo_prompts(w.seed)),
        processing_class=tokenizer,
        callbacks=[clock := StepClock()],
    )
    trainer.generations = []
    setup_s = time.perf_counter() - t_start
    trainer.train()
    t_total = time.perf_counter() - t_start

    steps = []
    for i, wall in enumerate(clock.walls):
        g = trainer.generations[i] if i < len(trainer.generations) else {}
        tokens = g.get("prompt_tokens", 0) + g.get("completion_tokens", 0)
        steps.append({
            "step": i + 1,
            "wall_s": wall,
            "generate_s": g.get("generate_s", math.nan),
            "sequences": g.get("sequences", 0),
            "prompt_tokens": g.get("prompt_tokens", 0),
            "completion_tokens": g.get("completion_tokens", 0),
            "tokens": tokens,
            "train_tokens_per_s": tokens / wall if wall > 0 else math.nan,
            "reward": g.get("reward", math.nan),
        })
    result.write_text(json.dumps({
        "name": "TRL GRPOTrainer",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "config": {k: getattr(args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation", "num_generations", "max_completion_length", "learning_rate",
            "lr_scheduler_type", "optim", "loss_type", "scale_rewards", "epsilon", "epsilon_high",
            "beta", "gradient_checkpointing", "bf16", "use_cpu", "temperature", "top_p", "top_k")},
        "stop_token_ids": stop_ids,
        "torch_threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "process_s": t_total,
        "setup_s": setup_s,
        "excluded_s": t_total - sum(clock.walls),
        "tokens_seen_by_trl": int(trainer.state.num_input_tokens_seen),
        "steps": steps,
    }))


# ---------------------------------------------------------------------------------------------
# Driver side: run workers one after the other, print tables
# ---------------------------------------------------------------------------------------------


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL what is left after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        return


def run_worker(kind: str, w: Workload, extra: list[str], timeout_s: float, verbose: bool,
               keep: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in a fresh subprocess; return its result, or ``{"error": ...}``.

    Its output directory is made and removed here (unless ``keep``), so that a worker that
    crashed or was killed leaves no run directory behind (a relayrl one holds gigabytes of
    checkpoint)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-loop-{kind}-"))
    try:
        return _run_worker_in(workdir, kind, w, extra, timeout_s, verbose, env or {})
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_worker_in(workdir: Path, kind: str, w: Workload, extra: list[str], timeout_s: float,
                   verbose: bool, env: dict[str, str]) -> dict[str, Any]:
    result = workdir / "result.json"
    log = workdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--workdir", str(workdir),
           "--workload", json.dumps(asdict(w)), "--result", str(result)]
    for item in extra:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        # A session of its own, so that a timeout ends the worker and everything it started
        # (Ray's processes included), and nothing else.
        proc = subprocess.Popen(cmd, cwd=REPO, env={**_thread_env(w.threads), **env}, start_new_session=True,
                                stdout=None if verbose else fh, stderr=None if verbose else subprocess.STDOUT)
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            rc = f"timeout after {timeout_s:.0f} s"
        except BaseException:
            _end_group(proc)
            raise
    wall = time.perf_counter() - t0
    if rc == 0 and result.is_file():
        out = json.loads(result.read_text())
        out["subprocess_s"] = wall
        return out
    tail = "" if verbose else "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return {"error": f"{kind} worker failed (exit {rc}) after {wall:.0f} s", "log_tail": tail}


def _fmt(x: Any, spec: str) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return format(x, spec)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    print(f"\n{title}" if title else "")
    cells = [[h for _, h, _ in columns]] + [[_fmt(r.get(k, math.nan), f) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            print("  " + "  ".join("-" * widths[i] for i in range(len(columns))))


def summarize(steps: list[dict[str, Any]], span: str) -> dict[str, float]:
    """Tokens, wall time and tokens/s over ``span``: ``all steps``, ``steps 2..N`` (without the
    first step's warm-up) or ``best step`` (the fastest one: the figure least disturbed by other
    load on a shared machine)."""
    if span == "steps 2..N" and len(steps) > 1:
        use = steps[1:]
    elif span == "best step":
        use = [max(steps, key=lambda s: s["tokens"] / s["wall_s"] if s["wall_s"] > 0 else 0.0)]
    else:
        use = steps
    tokens = sum(s["tokens"] for s in use)
    wall = sum(s["wall_s"] for s in use)
    return {"steps": len(use), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else math.nan,
            "completion_tokens": sum(s["completion_tokens"] for s in use),
            "prompt_tokens": sum(s["prompt_tokens"] for s in use)}


SPANS = ("all steps", "steps 2..N", "best step")


def print_environment(w: Workload) -> None:
    import torch

    print("== environment")
    print(f"  python {platform.python_version()} on {platform.platform()}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"  cpu_count {os.cpu_count()}, usable by this process {affinity}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    versions = {"torch": torch.__version__}
    for mod in ("transformers", "trl", "deepspeed", "ray"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # a missing peer is reported, not fatal
            versions[mod] = f"unavailable ({type(e).__name__})"
    print("  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"  torch threads here (default) {torch.get_num_threads()}; every worker: "
          f"torch.set_num_threads({w.threads}), OMP/MKL/OPENBLAS_NUM_THREADS={w.threads}")
    print("== workload")
    print("  " + ", ".join(f"{k}={v}" for k, v in asdict(w).items())
          + f"  ({w.sequences_per_step} sequences per step)")


LOOP_COLUMNS = [
    ("step", "step", "d"), ("generate_s", "generate", ".2f"), ("score_s", "score", ".2f"),
    ("values_s", "values", ".2f"), ("train_critic_s", "train critic", ".2f"),
    ("train_actor_s", "train actor", ".2f"), ("weight_sync_s", "weight sync", ".2f"),
    ("wall_s", "step s", ".2f"), ("tokens", "tokens", "d"), ("train_tokens_per_s", "train tok/s", ".1f"),
    ("reward", "reward", ".3f"),
]

PEER_COLUMNS = [
    ("step", "step", "d"), ("wall_s", "step s", ".2f"), ("generate_s", "generate", ".2f"),
    ("score_s", "score", ".2f"), ("train_s", "train", ".2f"), ("weight_sync_s", "sync", ".2f"),
    ("sequences", "seqs", ".0f"), ("prompt_tokens", "prompt tok", "d"), ("completion_tokens", "compl tok", "d"),
    ("train_tokens_per_s", "tok/s", ".1f"), ("reward", "reward", ".3f"),
]


def _print_failure(res: dict[str, Any]) -> None:
    print(f"  FAILED: {res['error']}")
    if res.get("log_tail"):
        print("  last lines of its output:")
        for line in res["log_tail"].splitlines():
            print("    | " + line)


def part_loop(w: Workload, extra: list[str], timeout_s: float, verbose: bool, keep: bool = False) -> None:
    print("\n== 1. loop breakdown: relayrl critic PPO (gae), toy_echo 2 turns, hermes parser, "
          f"{w.sequences_per_step} tasks x 1 per step")
    print("  overrides: " + " ".join(loop_overrides(w, "<tmp>") + extra))
    res = run_worker("relayrl-gae", w, extra, timeout_s, verbose, keep)
    if "error" in res:
        _print_failure(res)
        return
    print_table("seconds per step (time/*), train tokens/s (perf/train_tokens_per_s), from metrics.jsonl",
                res["steps"], LOOP_COLUMNS)
    print(f"  run dir {res['run_dir']} (removed unless --keep); process {res['process_s']:.1f} s, of which outside the steps "
          f"(start-up, checkpoint, teardown) {res['excluded_s']:.1f} s")


LABELS = {"trl": "TRL GRPOTrainer", "relayrl-grpo": "relayrl (grpo)"}


def _print_peer_run(kind: str, res: dict[str, Any], round_: int, repeat: int) -> None:
    label = LABELS[kind] + (f", round {round_ + 1}/{repeat}" if repeat > 1 else "")
    if "error" in res:
        print(f"\n-- {label}")
        _print_failure(res)
        return
    for s in res["steps"]:
        # TRL: everything after generation is the micro-batches' forward/backward and the optimizer step.
        s["train_s"] = s["train_actor_s"] if kind.startswith("relayrl") else s["wall_s"] - s["generate_s"]
    print_table(f"-- {label}: per training step", res["steps"], PEER_COLUMNS)
    if kind == "trl":
        print(f"  excluded from the step times: {res['excluded_s']:.1f} s (imports, model load "
              f"{res['model_load_s']:.1f} s, trainer set-up, teardown); torch threads "
              f"{res['torch_threads']}; TRL's own token count {res['tokens_seen_by_trl']}; "
              f"stop ids {res['stop_token_ids']}")
        if round_ == 0:
            print(f"  TRL config: {res['config']}")
    else:
        print(f"  excluded from the step times: {res['excluded_s']:.1f} s (imports, Ray, engine launch "
              "and model load, trainer set-up, final checkpoint, teardown)")
        if round_ == 0:
            print("  relayrl overrides: " + " ".join(res["overrides"]))


def part_peers(w: Workload, which: tuple[str, ...], extra: list[str], timeout_s: float, verbose: bool,
               repeat: int = 1, keep: bool = False, trl_env: dict[str, str] | None = None) -> None:
    print(f"\n== 2. peers: the same single-turn GRPO workload ({w.prompts} prompts x {w.group} "
          f"completions, <= {w.max_new_tokens} new tokens, {w.steps} steps, lr {w.lr:g}), run one after "
          f"the other{f', alternating, {repeat} rounds' if repeat > 1 else ''}")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in which}
    for round_ in range(repeat):
        for kind in which:  # sequential on purpose: the two must not share the cores
            res = run_worker(kind, w, extra if kind.startswith("relayrl") else [], timeout_s, verbose, keep,
                             None if kind.startswith("relayrl") else trl_env)
            _print_peer_run(kind, res, round_, repeat)
            if "error" not in res:
                runs[kind].append(res)

    if not any(runs.values()):
        return
    print("\n-- end-to-end tokens/s = (prompt + completion tokens) / wall time of the training steps")
    rows = []
    pooled: dict[tuple[str, str], dict[str, float]] = {}
    for kind, results in runs.items():
        for span in SPANS:
            tot = {"tokens": 0.0, "wall_s": 0.0}
            for i, res in enumerate(results):
                s = summarize(res["steps"], span)
                tot["tokens"] += s["tokens"]
                tot["wall_s"] += s["wall_s"]
                rows.append({"run": LABELS[kind], "round": f"{i + 1}" if repeat > 1 else "", "span": span, **s})
            pooled[(kind, span)] = tot
    print_table("", rows, [("run", "run", "s"), ("round", "round", "s"), ("span", "span", "s"),
                           ("steps", "steps", "d"), ("prompt_tokens", "prompt tok", "d"),
                           ("completion_tokens", "compl tok", "d"), ("tokens", "tokens", "d"),
                           ("wall_s", "wall s", ".2f"), ("tokens_per_s", "tok/s", ".1f")])
    if runs.get("trl") and runs.get("relayrl-grpo"):
        for span in SPANS:
            per_round = [
                summarize(r["steps"], span)["tokens_per_s"] / summarize(t["steps"], span)["tokens_per_s"]
                for r, t in zip(runs["relayrl-grpo"], runs["trl"])
            ]
            if span == "best step":  # the best step of all rounds on each side
                best = {k: max(summarize(res["steps"], span)["tokens_per_s"] for res in runs[k])
                        for k in ("relayrl-grpo", "trl")}
                ratio = best["relayrl-grpo"] / best["trl"]
            else:
                r, t = pooled[("relayrl-grpo", span)], pooled[("trl", span)]
                ratio = (r["tokens"] / r["wall_s"]) / (t["tokens"] / t["wall_s"])
            rounds = f" (per round: {', '.join(f'{x:.2f}x' for x in per_round)})" if repeat > 1 else ""
            print(f"  relayrl / TRL tokens/s, {span}: {ratio:.2f}x{rounds}")
        gen_r = sum(s["completion_tokens"] for res in runs["relayrl-grpo"] for s in res["steps"])
        gen_t = sum(s["completion_tokens"] for res in runs["trl"] for s in res["steps"])
        print(f"  completion tokens sampled: relayrl {gen_r}, TRL {gen_t} (both stop at the chat stop "
              "tokens; tokens/s divides by what each actually processed)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small workload: {QUICK}")
    p.add_argument("--only", choices=["all", "loop", "peers", "trl", "relayrl"], default="all",
                   help="loop: part 1; peers: part 2 (relayrl grpo, then TRL); trl / relayrl: one peer")
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts", type=int)
    p.add_argument("--group", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra relayrl override for the relayrl jobs (repeatable)")
    p.add_argument("--trl-malloc", action="store_true",
                   help="run TRL with the glibc malloc settings relayrl gives its actors (ray.keep_freed_memory)")
    p.add_argument("--repeat", type=int, default=1,
                   help="peer runs: alternate relayrl and TRL this many rounds (contention drifts)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--verbose", action="store_true", help="stream the workers' own output")
    p.add_argument("--keep", action="store_true", help="keep the run directories (relayrl's hold a checkpoint)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        w = Workload(**json.loads(a.workload))
        if a.worker == "trl":
            worker_trl(w, Path(a.result), Path(a.workdir))
        elif a.worker in ("relayrl-gae", "relayrl-grpo"):
            worker_relayrl(w, a.worker.split("-")[1], Path(a.result), a.set, Path(a.workdir))
        else:
            p.error(f"unknown worker {a.worker}")
        return 0

    w = QUICK if a.quick else DEFAULT
    sizes = {"steps": a.steps, "prompts": a.prompts, "group": a.group,
             "max_new_tokens": a.max_new_tokens, "threads": a.threads, "lr": a.lr}
    w = replace(w, **{k: v for k, v in sizes.items() if v is not None})
    if w.group < 2:
        p.error("--group: GRPO compares completions of the same prompt; give 2 or more")
    print_environment(w)
    trl_env = None
    if a.trl_malloc:
        from relayrl.rl.job import glibc_tunables

        trl_env = {"GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES"))}
        print(f"  TRL runs with {trl_env} (--trl-malloc: relayrl's actors get the same by default)")
    if a.only in ("all", "loop"):
        part_loop(w, a.set, a.timeout, a.verbose, a.keep)
    if a.only in ("all", "peers"):
        part_peers(w, ("relayrl-grpo", "trl"), a.set, a.timeout, a.verbose, a.repeat, a.keep, trl_env)
    elif a.only in ("trl", "relayrl"):
        part_peers(w, ("trl",) if a.only == "trl" else ("relayrl-grpo",), a.set, a.timeout, a.verbose,
                   a.repeat, a.keep, trl_env)
    print(f"\n== load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
