"""Tokens/s of the embedded CPU engine vs HF ``transformers`` ``generate``, same run, same prompts.

SmolLM2-135M-Instruct fp32, chat-formatted prompts, sampling at temperature 1 (top-p/top-k off,
EOS ignored so every sequence samples exactly ``--new-tokens`` tokens), ``--threads`` torch
threads for both. For each batch size the engine gets all requests at once (continuous batching
admits them in one prefill) and HF gets one left-padded ``generate`` call; tokens/s counts
sampled tokens over wall time, prefill included. The engine runs twice: computing every prompt
whole, as HF does (``min_prefix_reuse=0``), and with its default, where the prompts of a batch
that share a prefix (the chat template's system prompt) compute it once; nothing is kept from one
run to the next. ``--repeat`` alternates rounds and reports medians. Also times
a weight update from disk: the total (read + copy) and the part that pauses decoding (the
in-place copy).

Then an agent-like workload (``--episodes`` episodes of ``--turns`` turns, all episodes' turns
at once): each turn's prompt is the last one, its reply and a tool observation, so the context
grows. HF ``generate`` and the engine without reuse compute every turn's prompt whole; the
engine with reuse (the default, ``min_prefix_reuse=16``) continues each episode's kept keys
and values and prefills only the reply's last token and the observation.

    python bench/bench_engine.py            # batch 1, 8, 32; 128 new tokens
    python bench/bench_engine.py --quick    # batch 1, 8; 32 new tokens
    python bench/bench_engine.py --omp-passive   # OMP_WAIT_POLICY=PASSIVE for both

On a CPU shared with other busy processes, OpenMP threads that spin at barriers lose their
time slices and a 2-thread step can take several times longer; ``--omp-passive`` makes idle
threads sleep instead (it must be set before torch loads libgomp, hence a flag, not a setting).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

from relayrl.model import default_cache_dir, ensure_smollm2
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.engine import GenerateRequest, SamplingParams

QUESTIONS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a race condition is, with an example.",
    "How do I read a CSV file with pandas and drop empty rows?",
    "What does `git rebase -i` do?",
    "Fix the bug: for i in range(len(xs)): xs.remove(xs[i])",
    "Write a shell one-liner that counts lines in all .py files.",
    "What is the difference between a process and a thread?",
    "Implement binary search in Python and state its complexity.",
]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` chat prompts (distinct: the question and a request number vary)."""
    prompts = []
    for i in range(n):
        msg = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}]
        prompts.append(tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False))
    return [list(p) for p in prompts]


def bench_engine(engine: CpuEngine, prompts: list[list[int]], new_tokens: int) -> float:
    sp = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = engine.generate_many([GenerateRequest(p, s) for p, s in zip(prompts, sp)])
    dt = time.perf_counter() - t0
    assert all(len(o.output_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / dt


@torch.inference_mode()
def bench_hf(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
    )
    dt = time.perf_counter() - t0
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / dt


OBSERVATION = ("\n<|im_start|>user\nTool output: ran 12 tests, 11 passed, 1 failed: test_edge_case "
               "(AssertionError: expected [] but got None). Fix it and run again.<|im_end|>\n<|im_start|>assistant\n")


def multi_turn(generate, prompts: list[list[int]], obs: list[int], turns: int, new_tokens: int) -> tuple[float, int]:
    """Run the episodes through ``generate(prompts) -> outputs``; (sampled tokens/s, tokens of
    all prompts)."""
    ctx = [list(p) for p in prompts]
    prompt_tokens = 0
    t0 = time.perf_counter()
    for _ in range(turns):
        prompt_tokens += sum(len(c) for c in ctx)
        outs = generate(ctx)
        ctx = [c + o + obs for c, o in zip(ctx, outs, strict=True)]
    return len(prompts) * turns * new_tokens / (time.perf_counter() - t0), prompt_tokens


def engine_turns(engine: CpuEngine, new_tokens: int):
    def generate(ctx: list[list[int]]) -> list[list[int]]:
        sp = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(ctx))]
        return [o.output_ids for o in engine.generate_many([GenerateRequest(c, s) for c, s in zip(ctx, sp)])]
    return generate


@torch.inference_mode()
def hf_turns(model, tokenizer, new_tokens: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(ctx: list[list[int]]) -> list[list[int]]:
        width = max(len(c) for c in ctx)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctx])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        return out[:, width:].tolist()
    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, 32 new tokens")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="engine only")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per batch size (medians reported)")
    ap.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (see above)")
    ap.add_argument("--episodes", type=int, default=8, help="agent-like workload: concurrent episodes")
    ap.add_argument("--turns", type=int, default=4, help="agent-like workload: turns per episode (0 = skip it)")
    ap.add_argument("--turn-tokens", type=int, default=32, help="agent-like workload: new tokens per turn")
    args = ap.parse_args()
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    new_tokens = args.new_tokens or (32 if args.quick else 128)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = ensure_smollm2(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, max(batches))
    max_seq_len = max(len(p) for p in prompts) + new_tokens + 16

    t0 = time.perf_counter()
    # Two engines: one computes every prompt whole, as HF does (min_prefix_reuse=0); the other
    # runs the default, where prompts of one batch that share a prefix (here the chat template's
    # 24-token system prompt) compute it once. Each is flushed before a run, so nothing is kept
    # from one run to the next (the same prompts would otherwise continue their last run).
    engine = CpuEngine(model_dir, max_batch_size=max(batches), max_seq_len=max_seq_len, num_threads=args.threads,
                       min_prefix_reuse=0)
    engine_load_s = time.perf_counter() - t0
    shared = CpuEngine(model_dir, max_batch_size=max(batches), max_seq_len=max_seq_len, num_threads=args.threads)
    hf = None if args.skip_hf else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    # Warm-up (first-call allocations, thread pools) outside the timings.
    bench_engine(engine, prompts[:2], 4)
    bench_engine(shared, prompts[:2], 4)
    if hf is not None:
        bench_hf(hf, tokenizer, prompts[:2], 4)

    rows = []
    for b in batches:
        runs: dict[str, list[float]] = {"whole": [], "shared": [], "hf": []}
        for r in range(args.repeat):  # the three alternate, so a slow spell hits all of them
            runs["whole"].append(bench_engine(engine, prompts[:b], new_tokens))
            shared.flush_cache().result()
            before = shared.stats["prefix_reused_tokens"]
            runs["shared"].append(bench_engine(shared, prompts[:b], new_tokens))
            reused = shared.stats["prefix_reused_tokens"] - before
            runs["hf"].append(bench_hf(hf, tokenizer, prompts[:b], new_tokens) if hf is not None else float("nan"))
            print(f"batch {b:>3} round {r + 1}: engine {runs['whole'][-1]:7.1f} tok/s, with shared prefixes "
                  f"{runs['shared'][-1]:7.1f} tok/s ({reused} prompt tokens reused), hf {runs['hf'][-1]:7.1f} tok/s",
                  flush=True)
        rows.append((b, *(statistics.median(runs[k]) for k in ("whole", "shared", "hf"))))

    t0 = time.perf_counter()
    pause_s = engine.load_weights(model_dir, version=1)
    update_s = time.perf_counter() - t0
    engine.shutdown()
    shared.shutdown()

    prompt_lens = [len(p) for p in prompts]
    print()
    print(f"SmolLM2-135M-Instruct fp32, {args.threads} threads, {new_tokens} new tokens/sequence, "
          f"prompts {min(prompt_lens)}-{max(prompt_lens)} tokens, temperature 1.0, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, "
          f"load average at the end {os.getloadavg()[0]:.1f}"
          + (f", median of {args.repeat} rounds" if args.repeat > 1 else ""))
    print("| batch | engine tok/s | engine / HF | engine, shared prefixes tok/s | shared / HF | HF generate tok/s |")
    print("|------:|-------------:|------------:|------------------------------:|------------:|------------------:|")
    for b, e, sh, h in rows:
        print(f"| {b:>5} | {e:12.1f} | {e / h:10.2f}x | {sh:29.1f} | {sh / h:10.2f}x | {h:17.1f} |")
    print()
    print(f"engine load (weights + prepacked copies + KV cache): {engine_load_s:.2f} s")
    print(f"weight update from disk: {update_s:.2f} s total, decoding paused {pause_s * 1e3:.0f} ms "
          "(in-place copy and repacking)")
    if args.turns:
        agent_workload(args, model_dir, tokenizer, hf)


def agent_workload(args, model_dir, tokenizer, hf) -> None:
    obs = tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    starts = make_prompts(tokenizer, args.episodes)
    longest = max(len(p) for p in starts) + args.turns * (args.turn_tokens + len(obs)) + 16
    print(f"\nagent-like workload: {args.episodes} episodes x {args.turns} turns, {args.turn_tokens} new tokens a turn, "
          f"a {len(obs)}-token observation after each; contexts up to {longest - 16} tokens")
    print(f"| generator | tok/s | prompt tokens computed | ratio to HF |")
    print(f"|---|---:|---:|---:|")
    rows = []
    for label, reuse in (("engine, prefix reuse on", 16), ("engine, prefix reuse off", 0)):
        eng = CpuEngine(model_dir, max_batch_size=args.episodes, max_seq_len=longest, num_threads=args.threads,
                        min_prefix_reuse=reuse)
        # Warm-up on a prompt too short to be reused (below min_prefix_reuse).
        multi_turn(engine_turns(eng, 2), [tokenizer("warm up")["input_ids"]], obs, 1, 2)
        before = eng.stats["prefill_tokens"]
        tps, _ = multi_turn(engine_turns(eng, args.turn_tokens), starts, obs, args.turns, args.turn_tokens)
        rows.append((label, tps, eng.stats["prefill_tokens"] - before))
        eng.shutdown()
    if hf is not None:
        tps, prompt_tokens = multi_turn(hf_turns(hf, tokenizer, args.turn_tokens), starts, obs, args.turns, args.turn_tokens)
        rows.append(("HF generate", tps, prompt_tokens))
    base = rows[-1][1] if hf is not None else float("nan")
    for label, tps, computed in rows:
        print(f"| {label} | {tps:.1f} | {computed} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
