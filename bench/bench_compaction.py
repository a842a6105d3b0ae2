"""Peak memory and train-step time against trajectory length, compaction on vs off.

A trajectory of T turns (each turn ``--turn-tokens`` tokens: an action and its observation)
is trained either as one sequence (compaction off: the context grows with T) or as the
sub-traces compaction cuts it into (on: each at most ``--window`` tokens: the start prompt, a
summary and the turns since the last cut). One training step = forward + backward of the
policy (SmolLM2-135M-Instruct fp32, or ``--tiny``) over every sub-trace, one sub-trace per
micro-batch (as ``trainer.micro_batch_size: 1`` does), token-mean loss over action tokens.

Each (T, mode) runs in a fresh subprocess so its peak resident memory (VmHWM) is its own.
Expect: off grows with T (activations and attention of one ever longer sequence, and a
context no real model has beyond its window); on stays flat in memory and grows linearly in
time (more sub-traces, each bounded).

    python bench/bench_compaction.py               # T = 8, 16, 32, 48 turns of 64 tokens, window 1024
    python bench/bench_compaction.py --quick       # T = 4, 8, 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def segments(turns: int, turn_tokens: int, window: int, start_tokens: int, summary_tokens: int,
             compaction: bool) -> list[int]:
    """Lengths of the sub-traces of one trajectory."""
    if not compaction:
        return [start_tokens + turns * turn_tokens]
    lengths, current = [], start_tokens
    for _ in range(turns):
        if current + turn_tokens > window:
            lengths.append(current + summary_tokens)
            current = start_tokens + summary_tokens + turn_tokens  # start + summary + the kept turn
        current += turn_tokens
    lengths.append(current)
    return lengths


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    if args.tiny:
        from transformers import LlamaConfig

        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512, max_position_embeddings=65536))
    else:
        from relayrl.model import default_cache_dir, ensure_smollm2

        model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(default_cache_dir()), torch_dtype=torch.float32)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, 65536)
    model.train()
    lengths = segments(args.turns[0], args.turn_tokens, args.window, args.start_tokens, args.summary_tokens,
                       args.mode == "on")
    gen = torch.Generator().manual_seed(0)
    total_actions = sum(n // 2 for n in lengths)
    t0 = time.perf_counter()
    for n in lengths:
        tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
        mask = torch.zeros(1, n)
        mask[:, n // 2:] = 1.0  # half the tokens are actions (loss_mask 1)
        logits = model(input_ids=tokens).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask[:, 1:]).sum() / total_actions
        loss.backward()
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak_mb": hwm_kb / 1024, "segments": len(lengths),
                      "longest": max(lengths), "tokens": sum(lengths)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--turns", type=int, nargs="*", default=None)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--start-tokens", type=int, default=256)
    ap.add_argument("--summary-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    turns_list = args.turns or ([4, 8, 16] if args.quick else [8, 16, 32, 48])
    print(f"cpus {os.cpu_count()}, threads {args.threads}, load {os.getloadavg()[0]:.2f}; "
          f"{'tiny Llama' if args.tiny else 'SmolLM2-135M fp32'}; turn {args.turn_tokens} tokens, "
          f"window {args.window}, start {args.start_tokens}, summary {args.summary_tokens}")
    print(f"{'turns':>5} {'mode':>4} {'sub-traces':>10} {'longest':>8} {'tokens':>7} {'step s':>7} {'peak MB':>8}")
    base = [sys.executable, __file__, "--child", "--turn-tokens", str(args.turn_tokens), "--window", str(args.window),
            "--start-tokens", str(args.start_tokens), "--summary-tokens", str(args.summary_tokens),
            "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    results = {}
    for turns in turns_list:
        for mode in ("off", "on"):
            proc = subprocess.run(base + ["--turns", str(turns), "--mode", mode], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{turns:>5} {mode:>4} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(turns, mode)] = r
            print(f"{turns:>5} {mode:>4} {r['segments']:>10} {r['longest']:>8} {r['tokens']:>7} "
                  f"{r['seconds']:>7.2f} {r['peak_mb']:>8.0f}")
    for turns in turns_list:
        if (turns, "off") in results and (turns, "on") in results:
            off, on = results[(turns, "off")], results[(turns, "on")]
            print(f"T={turns:>3}: peak memory on/off {on['peak_mb'] / off['peak_mb']:.2f}, "
                  f"step time on/off {on['seconds'] / off['seconds']:.2f}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
