"""Scale-out backends on this machine: weight conversion and weight-sync seconds per GB, and
train tokens/s of the DeepSpeed and Megatron backends on the same tiny model, side by side.

1. Conversion: HF -> Megatron (TP 1, every rank of TP 2, every rank of 2 pipeline stages x TP 2)
   and Megatron -> HF of a synthetic Llama state dict (``--hidden``/``--layers``/``--vocab``,
   fp32), seconds per GB.
2. Weight sync to one CPU engine server (a separate process, ``python -m relayrl.rollout.server``)
   of a Llama of that size: ``disk`` (write safetensors + ``/update_weights_from_disk``: the
   engine reads and copies them) and ``distributed`` (``/update_weights_from_distributed``: a
   gloo broadcast from this process in ``--bucket-mb`` buckets, the path that is NCCL on GPUs).
3. Train tokens/s: ``train_step`` of the DeepSpeed (ZeRO-0, one rank) and Megatron (TP 1) backends,
   the same tiny Llama, batch and loss; tokens counted are all tokens of the batch.

megatron-core runs here through the CPU shims of ``tests/support/megatron_cpu.py`` (the
benchmark is a CPU measurement; on GPUs the backend runs unshimmed).

    .venv/bin/python bench/bench_backends.py            # hidden 768, 12 layers, vocab 32000 (~0.5 GB)
    .venv/bin/python bench/bench_backends.py --quick    # hidden 256, 4 layers
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def synthetic_llama(out_dir: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> Path:
    """An HF Llama checkpoint with random weights and a word-level tokenizer of ``vocab`` words."""
    from relayrl.model import make_tiny_model

    heads = max(4, hidden // 64)
    return make_tiny_model(out_dir, words=[f"w{i}" for i in range(vocab - 8)], hidden_size=hidden, num_layers=layers,
                           num_heads=heads, num_kv_heads=max(1, heads // 4) * 2 if heads >= 8 else 2,
                           intermediate_size=int(hidden * 8 / 3) // 64 * 64, max_position_embeddings=2048,
                           seed=seed, tie_word_embeddings=False)


def gb(state: dict[str, torch.Tensor]) -> float:
    from relayrl.rl.megatron_convert import hf_num_bytes

    return hf_num_bytes(state) / 1e9


def bench_conversion(model_dir: Path, repeat: int) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from relayrl.rl.megatron_convert import arch_from_hf_config, hf_to_megatron, megatron_to_hf

    hf = load_file(str(model_dir / "model.safetensors"))
    spec = arch_from_hf_config(AutoConfig.from_pretrained(model_dir))
    size = gb(hf)
    print(f"\n1. conversion, {size:.3f} GB fp32 ({sum(v.numel() for v in hf.values()) / 1e6:.1f} M params)")
    print(f"   {'direction':<28} {'s':>8} {'s/GB':>8}")
    for label, back_label, fn in [
        ("HF -> Megatron, TP 1", "Megatron -> HF, TP 1", lambda: [hf_to_megatron(hf, spec, 1, 0)]),
        ("HF -> Megatron, TP 2 (both)", "Megatron -> HF, TP 2", lambda: [hf_to_megatron(hf, spec, 2, r) for r in range(2)]),
        ("HF -> Megatron, PP 2 x TP 2", "Megatron -> HF, PP 2 x TP 2",
         lambda: [[hf_to_megatron(hf, spec, 2, r, pp_size=2, pp_rank=p) for r in range(2)] for p in range(2)]),
    ]:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            shards = fn()
            times.append(time.perf_counter() - t0)
        t = min(times)
        print(f"   {label:<28} {t:8.3f} {t / size:8.3f}")
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            back = megatron_to_hf(shards, spec)
            times.append(time.perf_counter() - t0)
        t = min(times)
        exact = all(torch.equal(back[k], hf[k]) for k in hf)
        print(f"   {back_label:<28} {t:8.3f} {t / size:8.3f}   round trip exact: {exact}")


def bench_sync(model_dir: Path, bucket_mb: int, threads: int) -> None:
    from safetensors.torch import load_file, save_file

    from relayrl.rl.distributed import free_port
    from relayrl.rollout.client import HttpEngineClient
    from relayrl.rollout.sglang_engine import DistributedWeightSender, EngineServer, ServerSpec

    state = load_file(str(model_dir / "model.safetensors"))
    new = {k: v + 0.01 for k, v in state.items()}
    size = gb(new)
    spec = ServerSpec(model_path=str(model_dir), launch=[sys.executable, "-m", "relayrl.rollout.server"], sglang=False,
                      extra_args=["--num-threads", str(threads), "--max-seq-len", "128", "--max-batch-size", "1"],
                      startup_timeout_s=600, log_dir=tempfile.mkdtemp(prefix="bench-engines-"))
    server = EngineServer(spec)
    print(f"\n2. weight sync to one CPU engine server, {size:.3f} GB fp32")
    print(f"   {'path':<44} {'s':>8} {'s/GB':>8}")
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as tmp:
            out = Path(tmp) / "v1"
            out.mkdir()
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                if (model_dir / f).exists():
                    (out / f).write_bytes((model_dir / f).read_bytes())
            t0 = time.perf_counter()
            save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"))
            t_write = time.perf_counter() - t0
            client = HttpEngineClient([server.url()], timeout_s=600)

            async def load() -> None:
                try:
                    await client.update_weights(str(out), 1)
                finally:
                    await client.close()

            t0 = time.perf_counter()
            asyncio.run(load())
            t_load = time.perf_counter() - t0
        print(f"   {'disk: write safetensors (/dev/shm)':<44} {t_write:8.3f} {t_write / size:8.3f}")
        print(f"   {'disk: /update_weights_from_disk':<44} {t_load:8.3f} {t_load / size:8.3f}")
        print(f"   {'disk: total':<44} {t_write + t_load:8.3f} {(t_write + t_load) / size:8.3f}")
        t0 = time.perf_counter()
        sender = DistributedWeightSender([server.url()], [1], "127.0.0.1", free_port(), backend="gloo")
        t_init = time.perf_counter() - t0
        stats = sender.send(new, version=2, bucket_bytes=bucket_mb * 2**20)
        stats2 = sender.send(state, version=3, bucket_bytes=bucket_mb * 2**20)
        t = min(stats["seconds"], stats2["seconds"])
        sender.close()
        print(f"   {'distributed: group init (once)':<44} {t_init:8.3f}")
        print(f"   {f'distributed: gloo broadcast, {bucket_mb} MB buckets':<44} {t:8.3f} {t / size:8.3f}"
              f"   ({int(stats['buckets'])} buckets)")
        print(f"   ratio disk total / distributed: {(t_write + t_load) / t:.2f}")
    finally:
        server.shutdown()


def bench_train(model_dir: Path, seqs: int, seq_len: int, steps: int) -> None:
    from support.megatron_cpu import install

    install()
    from relayrl.config import OptimConfig, TrainerConfig
    from relayrl.rl.deepspeed_backend import DeepSpeedBackend
    from relayrl.rl.megatron_backend import MegatronBackend

    g = torch.Generator().manual_seed(0)
    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    samples = [{"tokens": torch.randint(0, vocab, (seq_len,), generator=g), "loss_mask": torch.ones(seq_len, dtype=torch.long)}
               for _ in range(seqs)]
    n = seqs * seq_len

    def nll(outputs, mb):
        loss = -(outputs["logprobs"] * mb["loss_mask"]).sum() / n
        return loss, {}

    optim = OptimConfig(lr=1e-5)
    backends = {
        "deepspeed (ZeRO-0)": DeepSpeedBackend("policy", model_dir, TrainerConfig(micro_batch_size=4, zero_stage=0), optim),
        "megatron (TP 1, packed)": MegatronBackend("policy", model_dir, TrainerConfig(
            backend="megatron", micro_batch_size=4, megatron={"pack_sequences": True}), optim),
        "megatron (TP 1, padded)": MegatronBackend("policy", model_dir, TrainerConfig(
            backend="megatron", micro_batch_size=4, megatron={"pack_sequences": False}), optim),
    }
    print(f"\n3. train_step tokens/s, {seqs} x {seq_len} tokens, micro-batch 4, median of {steps} steps after 1 "
          "warm-up; the backends take turns step by step, so they share whatever else loads the machine")
    print(f"   {'backend':<26} {'s/step':>8} {'tokens/s':>10}")
    times: dict[str, list[float]] = {name: [] for name in backends}
    for b in backends.values():
        b.train_step(samples, nll)
    for _ in range(steps):
        for name, b in backends.items():
            t0 = time.perf_counter()
            b.train_step(samples, nll)
            times[name].append(time.perf_counter() - t0)
    rates = {}
    for name, ts in times.items():
        dt = sorted(ts)[len(ts) // 2]
        rates[name] = n / dt
        print(f"   {name:<26} {dt:8.3f} {n / dt:10.1f}")
    base = rates["deepspeed (ZeRO-0)"]
    for name, r in rates.items():
        print(f"   ratio {name} / deepspeed: {r / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per backend")
    ap.add_argument("--only", choices=["conversion", "sync", "train"], default=None)
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab = 256, 4, 8000
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"bench_backends: {time.strftime('%Y-%m-%d %H:%M')} load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{args.threads} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "conversion", "sync"):
            big = synthetic_llama(Path(tmp) / "big", args.hidden, args.layers, args.vocab)
            if args.only in (None, "conversion"):
                bench_conversion(big, args.repeat)
            if args.only in (None, "sync"):
                bench_sync(big, args.bucket_mb, args.threads)
        if args.only in (None, "train"):
            small = synthetic_llama(Path(tmp) / "small", 256, 4, 4096, seed=1)
            bench_train(small, seqs=16, seq_len=128, steps=2 if args.quick else args.steps)


if __name__ == "__main__":
    main()
