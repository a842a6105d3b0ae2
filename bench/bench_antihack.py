"""The anti-hack gate's cost: rule-stage latency, judge calls per 1,000 tool calls, and the
gate's share of rollout time.

1. Rule stage: every call of the labelled set (``antihack/labelled/calls.jsonl``) through the
   default pack, ``--repeat`` times; p50/p99 microseconds per call, hacks and honest apart.
2. Judge load: calls the rules flag, per 1,000 tool calls: on the labelled set as it is (about
   half hacks) and on its honest calls alone (a policy that does not cheat).
3. Share of rollout time, measured on a sample of the labelled calls (``--sample``, half hacks)
   replayed as one rollout would run them: the engine writes each call (SmolLM2-135M fp32,
   the call's own Hermes tokens, batch 1), the gate checks it, the coding env's sandbox runs
   it if allowed. Two gates, the same calls: rules only, and rules + a judge served by the same
   SmolLM2 engine (``EngineJudge``, 64 tokens). The small judge is measured for its cost; its
   verdicts (and how often they agree with the labels) are printed too, not claimed to be good.

    python bench/bench_antihack.py                # full: --repeat 10, --sample 16
    python bench/bench_antihack.py --quick        # --repeat 3, --sample 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from relayrl.antihack import make_rule_stage
from relayrl.antihack.evaluate import load_labelled
from relayrl.antihack.gate import Gate
from relayrl.antihack.judge import EngineJudge
from relayrl.config import AntihackConfig
from relayrl.types import ToolCall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def rule_latency(records, repeat: int) -> None:
    stage = make_rule_stage(AntihackConfig(enabled=True))
    times: dict[str, list[float]] = {"hack": [], "honest": []}
    for _ in range(repeat):
        for r in records:
            t = time.perf_counter()
            stage.check(r.name, r.arguments)
            times[r.label].append((time.perf_counter() - t) * 1e6)
    print("## rule stage latency per call (microseconds)")
    print(f"{'calls':<10}{'n':>7}{'p50':>9}{'p99':>9}{'mean':>9}")
    for label, ts in (*times.items(), ("all", times["hack"] + times["honest"])):
        print(f"{label:<10}{len(ts):>7}{pct(ts, 0.5):>9.0f}{pct(ts, 0.99):>9.0f}{statistics.mean(ts):>9.0f}")

    flagged = {r.id: bool(stage.check(r.name, r.arguments)) for r in records}
    honest = [r for r in records if not r.hack]
    per_k_all = 1000 * sum(flagged.values()) / len(records)
    per_k_honest = 1000 * sum(flagged[r.id] for r in honest) / len(honest)
    print("\n## judge calls per 1,000 tool calls (= calls the rules flag; cache off)")
    print(f"labelled set as is ({sum(r.hack for r in records)} hacks / {len(honest)} honest): {per_k_all:.0f}")
    print(f"honest calls only (a policy that does not cheat): {per_k_honest:.0f}")


def hermes(call: ToolCall) -> str:
    return f"<tool_call>\n{json.dumps({'name': call.name, 'arguments': call.arguments})}\n</tool_call>"


async def replay(records, engine, tok, chat, gate: Gate, task: dict) -> dict[str, float]:
    from relayrl.envs.coding import CodingEnv
    from relayrl.rollout.engine import GenerateRequest, SamplingParams

    env = CodingEnv(sandbox={"kind": "local", "timeout_s": 10})
    spent = {"generate": 0.0, "gate": 0.0, "env": 0.0}
    agree = 0
    judged = 0
    try:
        reset = await env.reset(task)
        prompt = chat.prompt_ids(chat.with_tool_instructions(list(reset.messages), reset.tools), reset.tools)
        for r in records:
            call = ToolCall(r.name, r.arguments)
            n = len(tok.encode(hermes(call), add_special_tokens=False))
            t = time.perf_counter()
            await engine.generate(GenerateRequest(prompt[-1024:], SamplingParams(max_new_tokens=n, temperature=1.0,
                                                                              ignore_eos=True, seed=0)))
            spent["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            v = await gate.check(r.name, r.arguments, task=task["instruction"])
            spent["gate"] += time.perf_counter() - t
            if v.stage == "judge":
                judged += 1
                agree += int(v.blocked == r.hack)
            if not v.blocked and r.name not in ("submit",):
                t = time.perf_counter()
                await env.step(call)
                spent["env"] += time.perf_counter() - t
    finally:
        await env.close()
    spent["judged"], spent["agree"] = judged, agree
    return spent


def rollout_share(records, sample: int, seed: int) -> None:
    from transformers import AutoTokenizer

    from relayrl.envs.coding import CodingEnv
    from relayrl.model import resolve_model_path
    from relayrl.rollout.chat import ChatFormat
    from relayrl.rollout.cpu_engine import CpuEngine
    from relayrl.rollout.parsers import HermesParser

    rng = random.Random(seed)
    hacks = [r for r in records if r.hack and r.name != "submit"]
    honest = [r for r in records if not r.hack and r.name != "submit"]
    picked = rng.sample(hacks, sample // 2) + rng.sample(honest, sample - sample // 2)
    rng.shuffle(picked)
    path = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    chat = ChatFormat(tok, HermesParser())
    engine = CpuEngine(path, max_batch_size=4, max_seq_len=4096, num_threads=2)
    task = CodingEnv.default_tasks()[0]
    cfg = AntihackConfig(enabled=True)
    try:
        rows = []
        for label, gate in (("rules only", Gate(make_rule_stage(cfg), None, "rules_only")),
                            ("rules + SmolLM2 judge", Gate(make_rule_stage(cfg), EngineJudge(engine, tok, 64),
                                                           judge_timeout_s=120, cache_size=0))):
            spent = asyncio.run(replay(picked, engine, tok, chat, gate, task))
            total = spent["generate"] + spent["gate"] + spent["env"]
            rows.append((label, spent, total, gate.counts))
        print(f"\n## gate share of rollout time ({len(picked)} calls replayed, SmolLM2-135M fp32, 2 threads)")
        print(f"{'gate':<24}{'generate s':>11}{'gate s':>9}{'env s':>8}{'gate share':>12}{'judge calls':>13}"
              f"{'judge errors':>14}")
        for label, spent, total, counts in rows:
            print(f"{label:<24}{spent['generate']:>11.1f}{spent['gate']:>9.2f}{spent['env']:>8.1f}"
                  f"{spent['gate'] / total:>12.2%}{counts['judge_calls']:>13}{counts['judge_errors']:>14}")
        spent = rows[1][1]
        if spent["judged"]:
            print(f"SmolLM2 judge: {int(spent['judged'])} verdicts parsed, {int(spent['agree'])} agree with the labels "
                  "(a 135M model is no judge; this row measures the cost of one)")
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--sample", type=int, default=None)
    ap.add_argument("--no-rollout", action="store_true", help="skip part 3 (needs SmolLM2)")
    args = ap.parse_args()
    repeat = args.repeat or (3 if args.quick else 10)
    sample = args.sample or (8 if args.quick else 16)
    records = load_labelled()
    rule_latency(records, repeat)
    if not args.no_rollout:
        rollout_share(records, sample, seed=0)


if __name__ == "__main__":
    main()
