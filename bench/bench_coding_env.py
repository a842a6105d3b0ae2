"""Episode throughput of the coding env with a scripted agent, against the engine that would
have to generate those episodes: is the env ever the bottleneck of a rollout?

The scripted agent plays each shipped task's reference episode (no model): ``read_file`` the
first workspace file, ``bash ls``, ``write_file`` the solution, ``run_tests``, ``submit``; then
``score`` runs the hidden tests in a clean sandbox. Episodes run ``C`` at a time on one event
loop (a rollout worker's concurrency), local sandboxes.

The peer, measured in the same run: the embedded CPU engine (SmolLM2-135M-Instruct fp32)
generating the same episodes' assistant tokens (the Hermes-formatted tool calls, tokenized
with SmolLM2's tokenizer) at a batch of 16. ``env / engine`` is the env's episode time as a
fraction of the time the engine needs to write the episode: far below 1 means the env is not
the bottleneck, even on the CPU that runs both.

    python bench/bench_coding_env.py            # concurrency 1, 4, 16; 32 episodes each
    python bench/bench_coding_env.py --quick    # concurrency 1, 4; 8 episodes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import defaultdict

from relayrl.envs.coding import CodingEnv
from relayrl.types import ToolCall


def scripted_calls(task: dict) -> list[ToolCall]:
    first = task["files"][0]["path"]
    return [ToolCall("read_file", {"path": first}), ToolCall("bash", {"command": "ls -R"}),
            *CodingEnv.reference_calls(task)[:-1], ToolCall("run_tests", {}), ToolCall("submit", {})]


async def episode(task: dict, latencies: dict[str, list[float]]) -> float:
    env = CodingEnv(sandbox={"kind": "local", "timeout_s": 30})
    t0 = time.perf_counter()
    try:
        t = time.perf_counter()
        await env.reset(task)
        latencies["reset"].append(time.perf_counter() - t)
        for call in scripted_calls(task):
            t = time.perf_counter()
            await env.step(call)
            latencies[call.name].append(time.perf_counter() - t)
        t = time.perf_counter()
        score = await env.score()
        latencies["score"].append(time.perf_counter() - t)
        assert score.reward == 1.0, (task["id"], score)
    finally:
        await env.close()
    return time.perf_counter() - t0


async def run_level(tasks: list[dict], concurrency: int, episodes: int) -> tuple[float, list[float], dict]:
    sem = asyncio.Semaphore(concurrency)
    latencies: dict[str, list[float]] = defaultdict(list)

    async def one(i: int) -> float:
        async with sem:
            return await episode(tasks[i % len(tasks)], latencies)

    t0 = time.perf_counter()
    times = await asyncio.gather(*(one(i) for i in range(episodes)))
    return time.perf_counter() - t0, list(times), latencies


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def episode_tokens(tasks: list[dict], tokenizer) -> float:
    """Mean assistant tokens of a scripted episode, as Hermes tool calls."""
    counts = []
    for task in tasks:
        text = "".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
                       for c in scripted_calls(task))
        counts.append(len(tokenizer(text)["input_ids"]))
    return statistics.mean(counts)


def engine_tokens_per_s(model_dir, batch: int, new_tokens: int) -> float:
    from relayrl.rollout.cpu_engine import CpuEngine
    from relayrl.rollout.engine import GenerateRequest, SamplingParams

    engine = CpuEngine(model_dir, max_batch_size=batch, max_seq_len=512, num_threads=2)
    try:
        reqs = [GenerateRequest([1, 2, 3, 4 + i], SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True))
                for i in range(batch)]
        engine.generate_many(reqs[:2])  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate_many(reqs)
        return sum(len(o.output_ids) for o in outs) / (time.perf_counter() - t0)
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="*", default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine peer")
    args = ap.parse_args()
    levels = args.concurrency or ([1, 4] if args.quick else [1, 4, 16])
    episodes = args.episodes or (8 if args.quick else 32)

    tasks = CodingEnv.default_tasks()
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; {len(tasks)} tasks, {episodes} episodes per level")
    print(f"{'C':>3} {'episodes/s':>11} {'episode p50 s':>14} {'p99 s':>7}   per call p50 ms: "
          "reset read bash write run_tests score")
    rows = []
    for c in levels:
        wall, times, lat = asyncio.run(run_level(tasks, c, episodes))
        eps = episodes / wall
        rows.append((c, eps, statistics.median(times)))
        per = " ".join(f"{1000 * statistics.median(lat[k]):.0f}" for k in
                       ("reset", "read_file", "bash", "write_file", "run_tests", "score"))
        print(f"{c:>3} {eps:>11.2f} {statistics.median(times):>14.2f} {pct(times, 0.99):>7.2f}   {per}")

    if args.no_engine:
        return
    from transformers import AutoTokenizer

    from relayrl.model import default_cache_dir, ensure_smollm2

    model_dir = ensure_smollm2(default_cache_dir())
    tokens = episode_tokens(tasks, AutoTokenizer.from_pretrained(model_dir))
    tps = engine_tokens_per_s(model_dir, batch=16, new_tokens=32 if args.quick else 64)
    engine_eps = tps / tokens
    print(f"\nengine peer: SmolLM2-135M fp32, batch 16: {tps:.1f} tok/s; a scripted episode is "
          f"{tokens:.0f} assistant tokens -> {engine_eps:.3f} episodes/s")
    for c, eps, _ in rows:
        print(f"C={c:>2}: env {eps:.2f} episodes/s = {eps / engine_eps:.1f}x the engine's; "
              f"env time per episode / engine time per episode = {engine_eps / eps:.3f}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
