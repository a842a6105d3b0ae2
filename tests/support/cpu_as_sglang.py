"""``python -m support.cpu_as_sglang --model-path ... --tp-size N [--base-gpu-id G] ...``: start
relayrl's CPU engine server where a job would start ``sglang.launch_server``.

SGLang needs GPUs and is never installed on the CPU machine; this launcher lets the tests drive
the ``engine.kind: sglang`` code path (placement on Ray's logical GPUs, one server actor per
engine, restart of a server process inside a live actor) with a real server that speaks the same
HTTP API. It accepts the SGLang flags relayrl passes, drops the GPU-only ones (``--tp-size``,
``--base-gpu-id``, ``--mem-fraction-static``) and prints which it dropped as its first line.
"""

from __future__ import annotations

import sys

GPU_ONLY = {"--tp-size", "--base-gpu-id", "--mem-fraction-static"}


def main(argv: list[str]) -> None:
    kept, dropped = [], []
    it = iter(argv)
    for a in it:
        if a in GPU_ONLY:
            dropped += [a, next(it)]
        else:
            kept.append(a)
    print(f"cpu_as_sglang: SGLang-only flags dropped: {' '.join(dropped)}", flush=True)
    from relayrl.rollout.server import main as serve

    serve(kept)


if __name__ == "__main__":
    main(sys.argv[1:])
