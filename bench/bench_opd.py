"""Teacher scoring throughput, and the teacher phase of a distillation step with 1, 4 and 10
teachers, with and without eviction.

1. Scoring tokens/s: one teacher in the pool (an in-process ``CpuEngine``) scores a step's worth
   of sequences; the peer is HF transformers' forward over the same sequences in batches, with
   the same thread count, measured in the same run (ratio = pool / peer).
2. Step: a distillation step's teacher phase is ``TeacherPool.score`` of every sequence of the
   step, each routed to its domain's teacher (domains spread evenly over the teachers). It is
   what changes with the number of teachers; generation and the student's update do not (their
   cost is the same per token whatever teacher scored it). For K = 1, 4, 10 teachers: without
   eviction (all K resident) and with it (room for K // 2, and for 10 also 4), after one warm-up
   step; seconds per step, loads (swaps) per step, and the seconds spent loading. For 10 with
   room for 4, the plain-LRU fixed-order baseline (``schedule=config_order``) is measured too.

Teachers are distinct random checkpoints of one architecture: SmolLM2-135M's (``--model
smollm2``, the default when it is cached: 540 MB each in fp32) or a 4-layer 256-wide Llama with
SmolLM2's vocabulary (``--model small``, 33M parameters). Loading is real: safetensors from disk
into a fresh engine each time.

    python bench/bench_opd.py                  # 40 sequences x 256 tokens per step
    python bench/bench_opd.py --model small --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_teachers(root: Path, n: int, model: str) -> list[Path]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from relayrl.model import default_cache_dir, ensure_smollm2

    src = ensure_smollm2(default_cache_dir())
    tok = AutoTokenizer.from_pretrained(src)
    if model == "smollm2":
        config = AutoConfig.from_pretrained(src)
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512, max_position_embeddings=2048,
                             tie_word_embeddings=True)
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = root / f"teacher_{k}"
        m.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        paths.append(out)
    return paths


def requests_for(num_teachers: int, num_seqs: int, seq_len: int, vocab: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"t{i % num_teachers}", torch.randint(0, vocab, (seq_len,), generator=g).tolist()) for i in range(num_seqs)]


def bench_scoring(teacher: Path, reqs: list[tuple[str, list[int]]], threads: int, batch: int) -> None:
    from transformers import AutoModelForCausalLM

    from relayrl.config import TeacherConfig
    from relayrl.opd.pool import CpuTeacherLoader, TeacherPool

    tokens = sum(len(ids) for _, ids in reqs)
    pool = TeacherPool([TeacherConfig(name="t0", path=str(teacher), domains=["d"])],
                       CpuTeacherLoader(max_batch_size=64, max_seq_len=2048, num_threads=threads))
    pool.score(reqs[:2])  # load + warm up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        pool.score(reqs)
        times.append(time.perf_counter() - t0)
    pool.close()
    pool_tps = tokens / statistics.median(times)

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids = torch.tensor([r[1] for r in reqs])
    peer = []
    with torch.no_grad():
        model(input_ids=ids[:2])
        for _ in range(3):
            t0 = time.perf_counter()
            for b0 in range(0, len(ids), batch):
                x = ids[b0 : b0 + batch]
                logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
                logp[:, :-1].gather(-1, x[:, 1:, None])
            peer.append(time.perf_counter() - t0)
    peer_tps = tokens / statistics.median(peer)
    print(f"scoring: {len(reqs)} x {len(reqs[0][1])} tokens, {threads} threads")
    print(f"  pool (CpuEngine)      {pool_tps:10.0f} tokens/s   (median of 3: {statistics.median(times):.3f} s)")
    print(f"  HF forward, batch {batch:<3d} {peer_tps:10.0f} tokens/s   ratio pool/HF = {pool_tps / peer_tps:.2f}")


def bench_steps(teachers: list[Path], reqs_of, threads: int, steps: int) -> None:
    from relayrl.config import TeacherConfig
    from relayrl.opd.pool import CpuTeacherLoader, TeacherPool

    loader = CpuTeacherLoader(max_batch_size=64, max_seq_len=2048, num_threads=threads)
    print(f"step (teacher phase), {steps} measured steps after 1 warm-up:")
    print(f"  {'teachers':>8} {'resident':>8} {'schedule':>15} {'s/step':>8} {'loads/step':>10} {'load s/step':>11} {'tokens/s':>9}")
    for k in (1, 4, 10):
        cfgs = [TeacherConfig(name=f"t{i}", path=str(teachers[i]), domains=[f"d{i}"]) for i in range(k)]
        reqs = reqs_of(k)
        variants = [(k, "resident_first")]
        if k > 1:
            variants.append((k // 2, "resident_first"))
        if k == 10:
            variants += [(4, "resident_first"), (4, "config_order")]
        for resident, schedule in variants:
            pool = TeacherPool(cfgs, loader, max_resident=resident, schedule=schedule)
            pool.score(reqs)
            pool.stats()
            times, loads, load_s, tokens = [], [], [], 0.0
            for _ in range(steps):
                t0 = time.perf_counter()
                pool.score(reqs)
                times.append(time.perf_counter() - t0)
                s = pool.stats()
                loads.append(s["loads"])
                load_s.append(s["load_s"])
                tokens += s["tokens"]
            pool.close()
            mean = statistics.mean(times)
            print(f"  {k:>8} {resident:>8} {schedule:>15} {mean:8.3f} {statistics.mean(loads):10.1f} "
                  f"{statistics.mean(load_s):11.3f} {tokens / sum(times):9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--seqs", type=int, default=40, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="16 sequences x 128 tokens, 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.seqs, args.seq_len, args.steps = 16, 128, 2
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    root = Path(tempfile.mkdtemp(prefix="bench_opd_"))
    try:
        teachers = make_teachers(root, 10, args.model)
        vocab = 49152
        print(f"model {args.model}: {sum(f.stat().st_size for f in teachers[0].glob('*.safetensors')) / 2**20:.0f} MiB per teacher")
        bench_scoring(teachers[0], requests_for(1, args.seqs, args.seq_len, vocab), args.threads, batch=8)
        bench_steps(teachers, lambda k: requests_for(k, args.seqs, args.seq_len, vocab), args.threads, args.steps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
