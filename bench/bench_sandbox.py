"""Tool-call latency (p50/p99) and calls/s of sandboxes, local and remote, at 1, 8 and 32 at once.

Local: ``LocalSandboxProvider`` in this process (every exec is ``unshare`` + mounts + ``setpriv``
+ ``prlimit`` + ``bash``). Remote: a ``relayrl sandbox-server`` started as a subprocess on
loopback, driven through ``RemoteSandboxProvider`` (HTTP, token auth), so client and server do
not share an event loop, as on two hosts. Each of C concurrent sandboxes makes the same
sequence of calls; two kinds are timed separately:

- ``exec``: ``bash -c 'echo ok'`` (the floor of a ``bash`` tool call);
- ``file``: ``write_file`` of 4 KiB then ``read_file`` of it (a ``write_file`` tool call and a
  ``read_file`` one), timed as one pair.

    python bench/bench_sandbox.py            # C = 1, 8, 32; 40 calls per sandbox
    python bench/bench_sandbox.py --quick    # C = 1, 8; 10 calls
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from relayrl.envs.local_sandbox import LocalSandboxProvider
from relayrl.envs.remote_sandbox import RemoteSandboxProvider
from relayrl.envs.sandbox import SandboxLimits

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def run_level(provider, concurrency: int, calls: int) -> dict[str, tuple[list[float], float]]:
    sandboxes = [await provider.create({"seed.txt": "x"}) for _ in range(concurrency)]
    payload = os.urandom(4096)
    out: dict[str, tuple[list[float], float]] = {}
    try:
        for kind in ("exec", "file"):
            lat: list[float] = []

            async def worker(sb) -> None:
                for i in range(calls):
                    t = time.perf_counter()
                    if kind == "exec":
                        r = await sb.exec("echo ok")
                        assert r.stdout == "ok\n", r
                    else:
                        await sb.write_file(f"f{i}.bin", payload)
                        assert await sb.read_file(f"f{i}.bin") == payload
                    lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(sb) for sb in sandboxes))
            out[kind] = (lat, len(lat) / (time.perf_counter() - t0))
    finally:
        for sb in sandboxes:
            await sb.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="*", default=None)
    ap.add_argument("--calls", type=int, default=None, help="calls of each kind per sandbox")
    args = ap.parse_args()
    levels = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    calls = args.calls or (10 if args.quick else 40)

    token = secrets.token_hex(16)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "relayrl", "sandbox-server", "--port", str(port), "--max-sandboxes", "64"],
        cwd=ROOT, env={**os.environ, "RELAYRL_SANDBOX_TOKEN": token}, stdout=subprocess.PIPE, text=True)
    try:
        print(server.stdout.readline().strip())  # the server's banner: address, isolation
        local = LocalSandboxProvider(SandboxLimits(timeout_s=30))
        print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; local isolation mode: {local.mode}; "
              f"{calls} calls of each kind per sandbox")
        print(f"{'where':>6} {'C':>3} {'kind':>5} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8}")
        for name in ("local", "remote"):
            for c in levels:
                async def go():
                    provider = local if name == "local" else RemoteSandboxProvider(f"http://127.0.0.1:{port}", token)
                    try:
                        return await run_level(provider, c, calls)
                    finally:
                        if name == "remote":
                            await provider.close()

                for kind, (lat, rate) in asyncio.run(go()).items():
                    print(f"{name:>6} {c:>3} {kind:>5} {1000 * statistics.median(lat):>8.1f} "
                          f"{1000 * pct(lat, 0.99):>8.1f} {rate:>8.1f}")
        print(f"load after {os.getloadavg()[0]:.2f}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
