"""Black-box proxy overhead per call (ms), against calling the engine directly.

One conversation of T turns (each turn: the harness appends a 6-word tool result and asks
again; the model samples N tokens), run three ways on the same in-process ``CpuEngine``:

- ``engine``: the recorded token contexts replayed as ``engine.generate`` calls (the floor:
  no HTTP, no chat template);
- ``proxy tcp``: the ``openai`` client on this host -> the proxy over TCP (HTTP, message
  canonicalisation, prefix matching, template rendering of the continuation);
- ``proxy sandbox``: the example's calls from *inside* a local sandbox, as black-box mode runs
  them: ``openai`` client -> in-sandbox forwarder on 127.0.0.1 -> Unix socket -> proxy.

The proxy paths sample the same tokens as the replay (per-call seeds), so the difference in
time per call is the proxy's overhead. Overhead grows with the conversation: each call renders
the whole conversation twice to find the continuation's text, so it is also shown for the
first and the last quarter of the turns.

    python bench/bench_proxy.py                     # tiny random Llama, T = 64, N = 8
    python bench/bench_proxy.py --model smollm2     # SmolLM2-135M (engine time dominates)
    python bench/bench_proxy.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from transformers import AutoTokenizer  # noqa: E402

from relayrl.config import BlackboxConfig  # noqa: E402
from relayrl.envs.coding import make_sandbox_provider  # noqa: E402
from relayrl.rollout.blackbox import AGENT_DIR, FORWARDER, SOCKET, agent_command, sandbox_spec  # noqa: E402
from relayrl.rollout.chat import ChatFormat  # noqa: E402
from relayrl.rollout.cpu_engine import CpuEngine  # noqa: E402
from relayrl.rollout.engine import GenerateRequest, SamplingParams  # noqa: E402
from relayrl.rollout.parsers import HermesParser  # noqa: E402
from relayrl.rollout.proxy import EpisodeProxy, ProxySettings  # noqa: E402

CLIENT = r'''
import json, os, sys, time
from openai import OpenAI
turns, max_tokens = int(sys.argv[1]), int(sys.argv[2])
client = OpenAI(max_retries=0)
messages = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Count with me, one word at a time."}]
times = []
for t in range(turns):
    start = time.perf_counter()
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens).choices[0].message
    times.append(time.perf_counter() - start)
    messages.append(reply.model_dump(exclude_none=True))
    messages.append({"role": "user", "content": f"tool result number {t} is fine"})
print(json.dumps(times))
'''


class Recording:
    def __init__(self, engine: CpuEngine) -> None:
        self.engine = engine
        self.prompts: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, request: GenerateRequest):
        self.prompts.append((list(request.input_ids), request.sampling))
        return await self.engine.generate(request)


def summary(name: str, times: list[float], floor: list[float] | None) -> str:
    ms = [t * 1000 for t in times]
    q = max(len(ms) // 4, 1)
    row = f"| {name} | {len(ms)} | {statistics.mean(ms):.2f} | {statistics.median(ms):.2f} | " \
          f"{statistics.mean(ms[:q]):.2f} | {statistics.mean(ms[-q:]):.2f} |"
    if floor is None:
        return row + " - | - |"
    fl = [t * 1000 for t in floor]
    over = statistics.mean(ms) - statistics.mean(fl)
    return row + f" {over:+.2f} | {statistics.mean(ms) / statistics.mean(fl):.2f} |"


def serve_in_thread(proxy: EpisodeProxy, how: str, path: str | None = None, uid: int | None = None):
    """Run the proxy on its own event loop thread (as a worker runs it beside the agent)."""
    loop = asyncio.new_event_loop()
    port: list[int] = []
    ready = threading.Event()

    async def start():
        if how == "tcp":
            port.append(await proxy.start_tcp())
        else:
            await proxy.start_unix(path, uid)
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    t.start()
    ready.wait(30)

    def stop():
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
    return (port[0] if port else None), stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (a random Llama) or smollm2")
    ap.add_argument("--turns", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    turns = 16 if args.quick else args.turns
    torch_threads = int(os.environ.get("RELAYRL_BENCH_THREADS", "2"))
    if args.model == "smollm2":
        from relayrl.model import default_cache_dir, ensure_smollm2

        model = ensure_smollm2(default_cache_dir())
    else:
        from relayrl.model import make_tiny_model

        words = "you are a helpful assistant count with me one word at time tool result number is fine".split()
        model = make_tiny_model(Path(tempfile.mkdtemp()) / "m", words=words + [str(i) for i in range(256)],
                                max_position_embeddings=4096)
    engine = CpuEngine(model, max_batch_size=4, max_seq_len=4096, num_threads=torch_threads)
    chat = ChatFormat(AutoTokenizer.from_pretrained(model), HermesParser())
    settings = ProxySettings(max_new_tokens=args.tokens, max_context_tokens=4096, seed=7, max_calls=10_000)

    # proxy over TCP, the client on this host
    import openai

    rec = Recording(engine)
    proxy = EpisodeProxy(rec, chat, HermesParser(), settings)
    port, stop = serve_in_thread(proxy, "tcp")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=proxy.api_key, max_retries=0)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Count with me, one word at a time."}]
    tcp: list[float] = []
    for t in range(turns):
        start = time.perf_counter()
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=args.tokens).choices[0].message
        tcp.append(time.perf_counter() - start)
        messages.append(reply.model_dump(exclude_none=True))
        messages.append({"role": "user", "content": f"tool result number {t} is fine"})
    stop()
    assert len(proxy.traces) == 1, "the conversation should be one sub-trace"

    # the engine alone, on exactly the recorded requests
    async def replay() -> list[float]:
        out = []
        for ids, sampling in rec.prompts:
            start = time.perf_counter()
            await engine.generate(GenerateRequest(ids, sampling))
            out.append(time.perf_counter() - start)
        return out
    direct = asyncio.run(replay())

    # from inside a sandbox, through the forwarder and the Unix socket
    async def sandboxed() -> list[float]:
        cfg = BlackboxConfig(enabled=True, command=f"python {AGENT_DIR}/agent/client.py {turns} {args.tokens}",
                             timeout_s=600)
        provider = make_sandbox_provider(sandbox_spec(cfg))
        sb = await provider.create()
        try:
            await sb.write_file(f"{AGENT_DIR}/forward.py", FORWARDER)
            await sb.write_file(f"{AGENT_DIR}/agent/client.py", CLIENT)
            p2 = EpisodeProxy(engine, chat, HermesParser(), settings)
            _, stop2 = serve_in_thread(p2, "unix", str(Path(sb.workspace) / SOCKET), getattr(sb, "uid", None))
            try:
                r = await sb.exec(agent_command(cfg, p2.api_key), timeout=600)
            finally:
                stop2()
            if r.exit_code != 0:
                raise RuntimeError(f"the sandboxed client failed: {r.stderr[-2000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            await sb.close()
            await provider.close()
    in_sandbox = asyncio.run(sandboxed())
    engine.shutdown()

    ctx = len(rec.prompts[-1][0])
    print(f"\nmodel {args.model}, {turns} turns of {args.tokens} sampled tokens, last context {ctx} tokens, "
          f"torch threads {torch_threads}, load average {os.getloadavg()[0]:.2f}\n")
    print("| path | calls | ms/call mean | p50 | first quarter | last quarter | overhead ms/call | x engine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(summary("engine.generate (floor)", direct, None))
    print(summary("proxy, TCP, client on host", tcp, direct))
    print(summary("proxy, sandbox: forwarder + Unix socket", in_sandbox, direct))


if __name__ == "__main__":
    main()
