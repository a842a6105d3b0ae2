"""Fused CPU kernels of the embedded engine, each beside the plain torch reference it must equal
(``csrc/cpu_kernels.cpp``; ``tests/test_cpu_kernels.py`` compares each pair).

- ``decode_attention``: a decode step's attention over the per-slot KV cache. On SmolLM2-135M at
  batch 32 about half of what torch's SDPA takes on the same inputs (SDPA with a length mask
  reads the keys and values at about half the speed this machine's memory allows; a decode step
  has one query per head, and SDPA's CPU kernel is built for long query blocks).
- ``rms_norm``: one pass per row instead of torch's five ops (a decode step runs 61 of them).
- ``rope_store``: a decode step's RoPE on q and k and the cache writes of k and v in one pass.

The C++ file is compiled on first use with torch's extension builder (a C++ compiler and ninja;
~18 s once per machine and torch version, cached under ``$RELAYRL_CACHE/kernels``) for x86 CPUs
with AVX2 (torch's CPU capability AVX2 or AVX512). Where that is not possible (another CPU, no
compiler, a failed build) or ``RELAYRL_CPU_KERNELS=0`` is set, ``load`` says why and the engine
runs the torch references instead: the same results, slower.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# Head dims the kernel is compiled for: multiples of the AVX2 vector width (8 floats), up to 128.
SUPPORTED_HEAD_DIMS = (8, 16, 32, 64, 128)

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "reason" -> None once loaded, else why not


def load() -> str | None:
    """Build (once) and load the kernels; None if they are ready, else the reason they are not."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load()
            if _state["reason"] is not None:
                log.warning("relayrl CPU kernels unavailable (%s); the engine runs the torch references (same results, slower).",
                            _state["reason"])
        return _state["reason"]


def _load() -> str | None:
    if os.environ.get("RELAYRL_CPU_KERNELS", "1") == "0":
        return "RELAYRL_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (this one: {platform.machine()}, torch capability {capability})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH; install g++ or set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package ships the binary
        except ImportError:
            return "ninja not found (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load as build

    from relayrl.model import default_cache_dir

    build_dir = default_cache_dir() / "kernels" / f"torch-{torch.__version__}-avx2"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("relayrl: building the CPU engine kernels in %s (once per machine, ~20 s)", build_dir)
    try:
        build(
            "relayrl_cpu_kernels", sources=[str(_SOURCE)], build_directory=str(build_dir), is_python_module=False,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-fopenmp"],
        )
    except Exception as exc:  # a compiler error, a missing header: fall back, say why
        lines = str(exc).strip().splitlines()
        return f"build failed in {build_dir}: {lines[-1] if lines else type(exc).__name__}"
    return None


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels cover a model of this head dim and dtype."""
    return dtype == torch.float32 and head_dim in SUPPORTED_HEAD_DIMS


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per head for slots ``0..n-1`` over their cached keys/values.

    q: ``[n, Hkv, G, D]`` (the G query heads of each KV head; last dim contiguous).
    k_cache, v_cache: ``[B, Hkv, S, D]`` contiguous, B >= n. lengths: ``[n]`` int64, slot i
    attends to its positions ``0..lengths[i]-1``. Returns ``[n, Hkv, G, D]``, scale 1/sqrt(D).
    Needs ``load() is None``.
    """
    return torch.ops.relayrl_cpu.decode_attention(q, k_cache, v_cache, lengths, q.shape[-1] ** -0.5)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (E,), w, eps)`` for a contiguous float32 ``x [..., E]``."""
    return torch.ops.relayrl_cpu.rms_norm(x, w, eps)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE on a decode step's new queries and keys; the keys and values written to the cache.

    qkv: ``[n, H + 2 Hkv, D]`` contiguous, each slot's new token's q, k and v heads. cos, sin:
    ``[S, D]`` from ``llama.rope_tables`` (sin signed). positions: ``[n]`` int64, the token's
    position. k_cache, v_cache: ``[B, Hkv, S, D]`` contiguous, B >= n; slot i's rotated keys and
    its values go to ``cache[i, :, positions[i]]``. Returns the rotated queries ``[n, H, D]``.
    """
    return torch.ops.relayrl_cpu.rope_store(qkv, cos, sin, positions, k_cache, v_cache, num_heads)


def rope_store_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``rope_store`` with ``llama.apply_rope`` and an indexed write."""
    from relayrl.rollout.llama import apply_rope

    n, hkv = qkv.shape[0], k_cache.shape[1]
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q = apply_rope(qkv[:, :num_heads], c, s)
    slots = torch.arange(n)
    k_cache[slots, :, positions] = apply_rope(qkv[:, num_heads : num_heads + hkv], c, s)
    v_cache[slots, :, positions] = qkv[:, num_heads + hkv :]
    return q


def length_mask(lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[n, 1, 1, max(lengths)]``: 0 where slot i has a cached position (``<
    lengths[i]``), -inf beyond (the stale positions of a shorter slot)."""
    n, span = lengths.shape[0], int(lengths.max())
    beyond = torch.arange(span)[None, :] >= lengths[:, None]
    return torch.zeros(n, 1, 1, span, dtype=dtype).masked_fill_(beyond.view(n, 1, 1, span), float("-inf"))


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``decode_attention`` with torch's SDPA over the keys up to the longest slot, masked by
    ``length_mask(lengths)`` (pass ``mask`` to reuse one across layers)."""
    if mask is None:
        mask = length_mask(lengths, q.dtype)
    n, span = q.shape[0], mask.shape[-1]
    return F.scaled_dot_product_attention(q, k_cache[:n, :, :span], v_cache[:n, :, :span], attn_mask=mask)
