"""A lean decoder-only transformer forward for the Llama family, written for CPU inference.

Covers Llama (1/2/3, incl. ``llama3`` rope scaling), Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on
q and k per head), loaded straight from an HF checkpoint directory (``config.json`` +
``*.safetensors``). No HF modeling code runs here; ``tests/test_engine.py`` checks every path
against HF ``*ForCausalLM`` on tiny random models.

Three entry points, all under ``torch.inference_mode``:

- ``prefill(prompts, slots)``: packed forward of several prompts; writes their keys/values into
  the per-slot KV cache and returns the logits of each prompt's last token.
- ``decode(tokens, positions)``: one token for each of the ``n`` active slots ``0..n-1`` at once,
  each at its own position; attention reads the cache up to the longest active length with a
  per-slot length mask.
- ``forward(token_ids)``: the simple reference: a full-sequence causal forward, no cache. Used to
  score sequences and, in tests, as the reference the cached paths must equal.

Notation: L layers, H query heads, Hkv key/value heads, G = H / Hkv (GQA group size), D head
dim, E hidden size, I MLP size, V vocab, B max batch (slots), S max sequence length.

Why fused weights: q/k/v are one ``[(H + 2 Hkv) D, E]`` matrix and gate/up one ``[2 I, E]``
matrix, so a decode step does 4 GEMMs per layer instead of 7 (fewer Python dispatches, better
GEMM shapes on a CPU).

Why compact slots: the engine keeps active sequences in slots ``0..n-1`` (a finishing sequence's
slot is filled by moving the last one into it, ``move_slot``), so attention reads a plain view
``cache[l, :n, :, :len]`` instead of gathering scattered slots every layer.

Why kernels: a decode step's attention, RMSNorm and RoPE are small ops that torch runs as many
passes (SDPA, built for long query blocks, read the cache at half the memory's speed);
``cpu_kernels`` has one-pass C++ versions, each beside the torch reference it must equal
(``LlamaModel(kernels=False)`` runs the references).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from relayrl.rollout import cpu_kernels

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture numbers of a checkpoint, read from its HF ``config.json``.

    qkv_bias: q/k/v projections have a bias (Qwen2 always; Llama/Qwen3 if ``attention_bias``).
    o_bias: the output projection has a bias (Llama/Qwen3 ``attention_bias``; never Qwen2).
    mlp_bias: gate/up/down have a bias (Llama ``mlp_bias``).
    qk_norm: RMSNorm over the head dim on q and k before RoPE (Qwen3).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaSpec":
        """Read an HF config dict; raise ValueError naming the field for anything unsupported."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r}: the CPU engine supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}; serve this model with SGLang (engine.kind=sglang)."
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={cfg['hidden_act']!r}: only 'silu' is supported.")
        if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
            raise ValueError("config.json: sliding-window attention is not supported by the CPU engine.")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope_config(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        )


def _rope_config(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, llama3 scaling params or None) from either config layout.

    transformers >= 5 writes ``rope_parameters: {rope_theta, rope_type, ...}``; older checkpoints
    write ``rope_theta`` and ``rope_scaling: {type|rope_type, ...}``.
    """
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported by the CPU engine.")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in need if k not in params]
        if missing:
            raise ValueError(f"config.json llama3 rope scaling is missing {missing}.")
        return theta, {k: float(params[k]) for k in need}
    raise ValueError(
        f"config.json rope scaling type {rope_type!r} is not supported by the CPU engine "
        "(supported: default, llama3). Serve this model with SGLang (engine.kind=sglang)."
    )


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` (float32), with llama3 scaling if configured.

    RoFormer (Su et al. 2021, eq. 15): theta_i = base^(-2i/D). Llama 3.1 scaling: wavelengths
    longer than original_len/low_freq_factor are stretched by ``factor``, shorter than
    original_len/high_freq_factor are kept, and the band between is interpolated linearly in
    ``original_len / wavelength``.
    """
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if spec.rope_scaling is None:
        return inv_freq
    p = dict(spec.rope_scaling)
    factor, low, high, orig = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, interpolated, scaled)


def rope_tables(spec: LlamaSpec, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables ``[S, D]`` for ``apply_rope``.

    Row p: ``cos = [cos(p w), cos(p w)]`` and ``sin = [-sin(p w), sin(p w)]`` (w = inverse
    frequencies ``[D/2]``); the sign of rotate-half is folded into the table.
    """
    inv_freq = rope_inv_freq(spec)
    angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, D]`` by RoPE (rotate-half convention); cos/sin ``[T, 1, D]`` from
    ``rope_tables`` (sin signed).

    Equals HF's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin


def onednn_packing_available() -> bool:
    """Whether this torch build can run linears on oneDNN pre-packed weights (x86 CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


PREPACKED_MIN_ROWS = 4


class Linear:
    """``y = x W^T + b``, optionally on a copy of W pre-packed in oneDNN's blocked layout.

    Why packed: a CPU GEMM with few rows (a decode step multiplies ``batch`` rows by every
    weight) spends much of its time laying W out for the kernel on every call; a copy laid out
    once per weight load skips that (a decode step of SmolLM2-135M at batch 32 about 1.1-1.25x
    faster on this 2-core machine, batch 8 1.27x). Below ``PREPACKED_MIN_ROWS`` rows oneDNN is
    slower than plain ``F.linear`` (batch 1: 0.85x), so those calls take the plain path. The cost
    is the copy (the weights' memory twice) and a repack after every weight load. ``F.linear`` on
    ``weight`` is the reference; the two agree to fp32 rounding (``tests/test_engine.py``).
    """

    __slots__ = ("weight", "bias", "prepacked")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.prepacked: torch.Tensor | None = None

    @classmethod
    def zeros(cls, out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> "Linear":
        return cls(torch.zeros(out_features, in_features, dtype=dtype), torch.zeros(out_features, dtype=dtype) if bias else None)

    def prepack(self, rows_hint: int) -> None:
        """(Re)build the packed copy from ``weight``; call after every change of ``weight``."""
        self.prepacked = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows_hint)

    def use_prepacked(self, x: torch.Tensor) -> bool:
        """Whether ``x [rows, in]`` runs on the packed copy (there is one and enough rows)."""
        return self.prepacked is not None and x.shape[0] >= PREPACKED_MIN_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_prepacked(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, self.bias, "none", [], "")

    # Fused forms (only where ``use_prepacked``): oneDNN applies the elementwise op to each
    # output tile of the GEMM while it is in cache, instead of a separate pass (and a Python
    # dispatch) over the result.

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) + other``."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.prepacked, self.bias, "add")

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) * other``."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.prepacked, self.bias, "mul")

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.silu(self(x))``."""
        return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, self.bias, "swish", [], "")


class LayerWeights:
    """One decoder layer's tensors, fused for fewer GEMMs (see module docstring)."""

    def __init__(self, spec: LlamaSpec, dtype: torch.dtype) -> None:
        e, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
        qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * d
        self.input_norm = torch.ones(e, dtype=dtype)
        self.qkv = Linear.zeros(qkv_out, e, spec.qkv_bias, dtype)
        self.q_norm = torch.ones(d, dtype=dtype) if spec.qk_norm else None
        self.k_norm = torch.ones(d, dtype=dtype) if spec.qk_norm else None
        self.o = Linear.zeros(e, spec.num_heads * d, spec.o_bias, dtype)
        self.post_norm = torch.ones(e, dtype=dtype)
        self.gate_up = Linear.zeros(2 * i, e, spec.mlp_bias, dtype)
        self.down = Linear.zeros(e, i, spec.mlp_bias, dtype)
        # Views of gate_up's halves: prepacked, the MLP runs them as two GEMMs with fused
        # activation and product (``LlamaModel._mlp_residual``).
        b = self.gate_up.bias
        self.gate = Linear(self.gate_up.weight[:i], None if b is None else b[:i])
        self.up = Linear(self.gate_up.weight[i:], None if b is None else b[i:])

    def prepacked_linears(self) -> tuple[Linear, ...]:
        """The linears the prepacked forward runs (gate and up, not their fused gate_up)."""
        return self.qkv, self.o, self.gate, self.up, self.down

    def targets(self, spec: LlamaSpec, prefix: str) -> dict[str, torch.Tensor]:
        """HF parameter name -> the (view of the) tensor it is copied into."""
        hd, kvd, i = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        wqkv, w_gate_up = self.qkv.weight, self.gate_up.weight
        t = {
            f"{prefix}.input_layernorm.weight": self.input_norm,
            f"{prefix}.post_attention_layernorm.weight": self.post_norm,
            f"{a}.q_proj.weight": wqkv[:hd],
            f"{a}.k_proj.weight": wqkv[hd : hd + kvd],
            f"{a}.v_proj.weight": wqkv[hd + kvd :],
            f"{a}.o_proj.weight": self.o.weight,
            f"{m}.gate_proj.weight": w_gate_up[:i],
            f"{m}.up_proj.weight": w_gate_up[i:],
            f"{m}.down_proj.weight": self.down.weight,
        }
        if (bqkv := self.qkv.bias) is not None:
            t[f"{a}.q_proj.bias"] = bqkv[:hd]
            t[f"{a}.k_proj.bias"] = bqkv[hd : hd + kvd]
            t[f"{a}.v_proj.bias"] = bqkv[hd + kvd :]
        if self.o.bias is not None:
            t[f"{a}.o_proj.bias"] = self.o.bias
        if self.q_norm is not None:
            t[f"{a}.q_norm.weight"] = self.q_norm
            t[f"{a}.k_norm.weight"] = self.k_norm
        if (b_gate_up := self.gate_up.bias) is not None:
            t[f"{m}.gate_proj.bias"] = b_gate_up[:i]
            t[f"{m}.up_proj.bias"] = b_gate_up[i:]
            t[f"{m}.down_proj.bias"] = self.down.bias
        return t


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; {model_dir} is not an HF checkpoint directory.")
    return json.loads(path.read_text())


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` shards in ``model_dir`` (any dtype, on CPU)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; save the checkpoint with safe_serialization=True.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    return state


class LlamaModel:
    """Weights, RoPE tables and a per-slot KV cache, with prefill / decode / forward.

    k_cache, v_cache: ``[L, B, Hkv, S, D]``, zero-initialised so that stale positions beyond a
    slot's length are finite (masked attention multiplies them by exactly 0; NaN would survive).

    prepack_weights: run the linears on oneDNN pre-packed copies of their weights (``Linear``);
    default: for fp32 where this torch build has oneDNN. ``False``: plain ``F.linear`` (the
    reference).

    kernels: run relayrl's fused CPU kernels (``cpu_kernels``: decode attention, RMSNorm, RoPE
    with the cache write); default: where they cover this model's head dim and dtype and can be
    built here (``cpu_kernels.load``). ``False``: the torch references (SDPA with a length mask,
    ``F.rms_norm``, ``apply_rope`` and ``index_copy_``).
    """

    def __init__(
        self,
        spec: LlamaSpec,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: torch.dtype = torch.float32,
        prepack_weights: bool | None = None,
        kernels: bool | None = None,
    ) -> None:
        if kernels is None:
            kernels = cpu_kernels.supports(spec.head_dim, dtype) and cpu_kernels.load() is None
        elif kernels:
            if not cpu_kernels.supports(spec.head_dim, dtype):
                raise ValueError(f"kernels=True: relayrl's CPU kernels cover float32 and head dims "
                                 f"{cpu_kernels.SUPPORTED_HEAD_DIMS}, not {dtype} / head_dim {spec.head_dim}")
            if (reason := cpu_kernels.load()) is not None:
                raise ValueError(f"kernels=True: relayrl's CPU kernels cannot be used here: {reason}")
        self.kernels = kernels
        if prepack_weights is None:
            prepack_weights = dtype == torch.float32 and onednn_packing_available()
        elif prepack_weights and not onednn_packing_available():
            raise ValueError("prepack_weights=True needs a torch build with oneDNN (mkldnn); this one has none")
        self.prepack_weights = prepack_weights
        self.spec = spec
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        s = spec
        self.embed = torch.zeros(s.vocab_size, s.hidden_size, dtype=dtype)
        self.lm_head = Linear(self.embed if s.tie_word_embeddings else torch.zeros(s.vocab_size, s.hidden_size, dtype=dtype))
        self.final_norm = torch.ones(s.hidden_size, dtype=dtype)
        self.layers = [LayerWeights(s, dtype) for _ in range(s.num_layers)]
        self.cos, self.sin = rope_tables(s, max_seq_len, dtype)
        cache_shape = (s.num_layers, max_batch_size, s.num_kv_heads, max_seq_len, s.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dtype)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype)
        self._positions = torch.arange(max_seq_len)
        self._targets = self._weight_targets()

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, max_batch_size: int = 32, max_seq_len: int = 2048,
        dtype: torch.dtype = torch.float32, prepack_weights: bool | None = None, kernels: bool | None = None,
    ) -> "LlamaModel":
        spec = LlamaSpec.from_hf_config(read_hf_config(model_dir))
        model = cls(spec, max_batch_size=max_batch_size, max_seq_len=max_seq_len, dtype=dtype,
                    prepack_weights=prepack_weights, kernels=kernels)
        model.load_state_dict(read_safetensors(model_dir))
        return model

    def weight_names(self) -> list[str]:
        """HF names of every tensor ``load_state_dict`` needs."""
        return list(self._targets)

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm}
        if not self.spec.tie_word_embeddings:
            t["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            t.update(layer.targets(self.spec, f"model.layers.{i}"))
        return t

    @torch.inference_mode()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy an HF state dict into the weights in place (shapes checked, dtype converted).

        In place, so a running engine keeps its buffers and views. Every expected tensor must be
        present; ``lm_head.weight`` of a tied checkpoint is ignored. Pre-packed copies are rebuilt.
        """
        missing = [k for k in self._targets if k not in state]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        for name, dst in self._targets.items():
            src = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)
        if self.prepack_weights:
            linears = [self.lm_head] + [lin for layer in self.layers for lin in layer.prepacked_linears()]
            # One reorder runs on one core (and spends much of its time faulting in the new
            # buffer's pages): side by side on every core, SmolLM2's take ~0.25 s instead of ~0.9.
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                list(pool.map(lambda linear: linear.prepack(self.max_batch_size), linears))

    # ----------------------------------------------------------------- pieces

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kernels and x.is_contiguous():
            return cpu_kernels.rms_norm(x, w, self.spec.rms_norm_eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.spec.rms_norm_eps)

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q ``[T, H, D]``, k and v ``[T, Hkv, D]`` with RoPE applied, from ``x [T, E]``.

        cos, sin: ``[T, 1, D]`` for the tokens' positions. q and k may be strided views.
        """
        s = self.spec
        t = x.shape[0]
        h = self._norm(x, layer.input_norm)
        qkv = layer.qkv(h).view(t, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        heads_qk = s.num_heads + s.num_kv_heads
        v = qkv[:, heads_qk:]
        if layer.q_norm is None:
            # q and k rotated together: one set of elementwise ops instead of two.
            qk = apply_rope(qkv[:, :heads_qk], cos, sin)
            return qk[:, : s.num_heads], qk[:, s.num_heads :], v
        q = self._norm(qkv[:, : s.num_heads], layer.q_norm)
        k = self._norm(qkv[:, s.num_heads : heads_qk], layer.k_norm)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _mlp_residual(self, layer: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x + attn @ Wo, then + the SwiGLU MLP (Shazeer 2020) of its norm. attn: ``[T, H*D]``."""
        if layer.o.use_prepacked(x):
            x = layer.o.add(attn, x)
            h = self._norm(x, layer.post_norm)
            return layer.down.add(layer.up.mul(h, layer.gate.silu(h)), x)
        x = x + layer.o(attn)
        h = self._norm(x, layer.post_norm)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        # In place: x and the activation are this step's own temporaries.
        return x.add_(layer.down(F.silu(gate).mul_(up)))

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence: q ``[T, H, D]``, k/v ``[T, Hkv, D]`` -> ``[T, H*D]``, causal, GQA."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, V]`` of final hidden states ``h [T, E]`` (final norm + LM head)."""
        return self.lm_head(self._norm(h, self.final_norm))

    # ----------------------------------------------------------------- forward paths

    @torch.inference_mode()
    def hidden_packed(self, seqs: list[list[int]], slots: list[int] | None = None,
                      starts: list[int] | None = None) -> torch.Tensor:
        """Hidden states ``[sum T_i, E]`` of sequences packed end to end, each at positions
        ``starts[i]..starts[i]+T_i-1`` (default 0..).

        Projections and MLP run on all tokens at once; attention runs on padded batches of
        sequences of similar lengths (``_padded_groups``), a sequence that continues a cached
        prefix on its own. With
        ``slots``, sequence i's keys/values are written to ``cache[:, slots[i], :, start:start+T_i]``
        and a sequence with ``starts[i] > 0`` continues the keys and values already cached at
        ``0..starts[i]-1`` of its slot (a prefix computed before: it attends to them too).
        """
        starts = starts or [0] * len(seqs)
        if slots is None and any(starts):
            raise ValueError("starts > 0 continue a cached prefix: they need slots")
        s = self.spec
        lens = [len(t) for t in seqs]
        self._check_lengths([st + n for st, n in zip(starts, lens, strict=True)])
        tokens = torch.tensor([tok for t in seqs for tok in t], dtype=torch.long)
        pos = torch.cat([self._positions[st : st + n] for st, n in zip(starts, lens, strict=True)])
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        offsets = [0, *_cumsum(lens)]
        groups = _padded_groups(lens, offsets, [i for i, st in enumerate(starts) if st == 0])
        prefixed = [i for i, st in enumerate(starts) if st > 0]
        whole = len(groups) == 1 and not prefixed and groups[0].in_order  # one group, packed order
        rows = None
        if slots is not None:
            # Row of (token t, kv head h) in a layer's cache viewed as [B*Hkv*S, D] (as in decode).
            slot_of = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lens))
            heads = self._positions[: s.num_kv_heads]
            rows = ((slot_of[:, None] * s.num_kv_heads + heads[None, :]) * self.max_seq_len + pos[:, None]).view(-1)
        x = self.embed[tokens]
        hd = s.num_heads * s.head_dim
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            if rows is not None:
                self.k_cache[li].view(-1, s.head_dim).index_copy_(0, rows, k.reshape(-1, s.head_dim))
                self.v_cache[li].view(-1, s.head_dim).index_copy_(0, rows, v.reshape(-1, s.head_dim))
            attn = None if whole else q.new_empty(len(tokens), hd)
            for g in groups:
                if g.gather is None:  # one sequence: no padding, the causal kernel
                    i = g.seqs[0]
                    out = self._causal_attention(*(t[offsets[i] : offsets[i + 1]] for t in (q, k, v)))
                else:
                    out = F.scaled_dot_product_attention(
                        q[g.gather].transpose(1, 2), k[g.gather].transpose(1, 2), v[g.gather].transpose(1, 2),
                        attn_mask=g.mask, enable_gqa=True,
                    ).transpose(1, 2).reshape(-1, hd)[g.take]
                if whole:
                    attn = out
                else:
                    attn[g.tokens] = out
            for i in prefixed:
                st, lo, hi = starts[i], offsets[i], offsets[i + 1]
                attn[lo:hi] = self._prefix_attention(q[lo:hi], self.k_cache[li, slots[i], :, : st + hi - lo],
                                                     self.v_cache[li, slots[i], :, : st + hi - lo], st)
            x = self._mlp_residual(layer, x, attn)
        return x

    def _prefix_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q ``[T, H, D]`` of the tokens at ``start..start+T-1``, k/v ``[Hkv, start+T, D]`` (the
        cached prefix and those tokens) -> ``[T, H*D]``: query i sees keys ``0..start+i``."""
        t = q.shape[0]
        allowed = self._positions[: start + t][None, :] <= (self._positions[:t] + start)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=allowed, enable_gqa=True)
        return out.transpose(0, 1).reshape(t, -1)

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Logits ``[T, V]`` of a whole sequence (no cache): the reference path, and scoring."""
        return self.forward_packed([token_ids])[0]

    @torch.inference_mode()
    def forward_packed(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Logits ``[T_i, V]`` of each of several sequences in one packed pass (no cache)."""
        h = self.hidden_packed(seqs)
        logits = self.logits(h)
        return list(logits.split([len(t) for t in seqs]))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], starts: list[int] | None = None) -> torch.Tensor:
        """Fill the cache of ``slots[i]`` with ``prompts[i]`` (at positions ``starts[i]..``, after a
        prefix already cached there); return last-token logits ``[n, V]``."""
        h = self.hidden_packed(prompts, slots=slots, starts=starts)
        last = torch.tensor(list(_cumsum(len(p) for p in prompts)), dtype=torch.long) - 1
        return self.logits(h[last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for slots ``0..n-1``; return logits ``[n, V]``.

        tokens: ``[n]`` the last sampled token of each slot. positions: ``[n]`` its position (=
        the slot's cached length before this step). Writes the new keys/values at
        ``cache[:, i, :, positions[i]]`` and attends over ``0..positions[i]``.

        The G query heads of one KV group are laid out along the query axis (``[n, Hkv, G, D]``),
        so grouped-query attention needs no repeated keys/values. With ``kernels``: RoPE and the
        cache writes in one ``cpu_kernels.rope_store`` (not for q/k-normed models), attention on
        ``cpu_kernels.decode_attention``.
        """
        s = self.spec
        n = tokens.shape[0]
        hkv, g, d = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        lengths = positions + 1
        fused_rope = self.kernels and not s.qk_norm
        # The reference's mask, once per step: each slot sees its own prefix and the new token.
        mask = None if self.kernels else cpu_kernels.length_mask(lengths, self.dtype)
        if not fused_rope:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
            # Row of (slot i, kv head h, position p) in a layer's cache viewed as [B*Hkv*S, D]:
            # one index_copy_ per layer writes all new keys (much cheaper than 2-D index_put).
            rows = ((self._positions[:n, None] * hkv + self._positions[None, :hkv]) * self.max_seq_len + positions[:, None]).view(-1)
        x = self.embed[tokens]
        for li, layer in enumerate(self.layers):
            kc, vc = self.k_cache[li], self.v_cache[li]
            if fused_rope:
                qkv = layer.qkv(self._norm(x, layer.input_norm)).view(n, s.num_heads + 2 * hkv, d)
                q = cpu_kernels.rope_store(qkv, self.cos, self.sin, positions, kc, vc, s.num_heads)
            else:
                q, k, v = self._qkv(layer, x, cos, sin)
                kc.view(-1, d).index_copy_(0, rows, k.reshape(n * hkv, d))
                vc.view(-1, d).index_copy_(0, rows, v.reshape(n * hkv, d))
            if self.kernels:
                attn = cpu_kernels.decode_attention(q.view(n, hkv, g, d), kc, vc, lengths)
            else:
                attn = cpu_kernels.decode_attention_reference(q.view(n, hkv, g, d), kc, vc, lengths, mask)
            x = self._mlp_residual(layer, x, attn.reshape(n, -1))
        return self.logits(x)

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst`` (all layers):
        compaction after a slot is freed, and prompts shared by several slots."""
        self.k_cache[:, dst, :, :length].copy_(self.k_cache[:, src, :, :length])
        self.v_cache[:, dst, :, :length].copy_(self.v_cache[:, src, :, :length])

    @torch.inference_mode()
    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the first ``length_a`` cached positions of slot ``a`` with the first
        ``length_b`` of slot ``b`` (all layers): a finished sequence's keys and values kept
        beyond the active slots while the last active slot fills its hole."""
        keep_k = self.k_cache[:, a, :, :length_a].clone()
        keep_v = self.v_cache[:, a, :, :length_a].clone()
        self.move_slot(b, a, length_b)
        self.k_cache[:, b, :, :length_a].copy_(keep_k)
        self.v_cache[:, b, :, :length_a].copy_(keep_v)

    def _check_lengths(self, lengths: Iterable[int]) -> None:
        for n in lengths:
            if not 0 < n <= self.max_seq_len:
                raise ValueError(f"sequence of {n} tokens: must be 1..{self.max_seq_len} (max_seq_len)")


@dataclass
class _Group:
    """Sequences of one packed prefill whose causal attention runs as one padded batch.

    seqs: their indices in the pack. tokens: ``[sum T_i]`` their tokens' rows in the pack, in
    ``seqs`` order. gather: ``[g, Tmax]`` the pack row of each padded position (padding repeats
    a real row; None for a group of one, which needs no padding). mask: ``[g, 1, Tmax, Tmax]``
    True where a query may see a key (causal, real keys only). take: ``[sum T_i]`` the rows of
    the flattened ``[g * Tmax]`` output that are real tokens, in ``tokens`` order. in_order:
    ``tokens`` is ``0..`` (the output needs no scatter).
    """

    seqs: list[int]
    tokens: torch.Tensor
    gather: torch.Tensor | None
    mask: torch.Tensor | None
    take: torch.Tensor | None
    in_order: bool


def _padded_groups(lens: list[int], offsets: list[int], members: list[int], waste: float = 2.0) -> list[_Group]:
    """Group the sequences ``members`` (lengths ``lens``, pack offsets ``offsets``) for padded
    attention: by length, longest first, a group grows while its padded attention area
    ``g * Tmax^2`` stays within ``waste`` times the real one (the sum of ``T_i^2``).

    Why: one batched attention call per group instead of one per sequence (a prefill of 32
    short prompts ran 32 small calls in each of the 30 layers of SmolLM2).
    """
    groups: list[list[int]] = []
    area = 0
    for i in sorted(members, key=lambda i: -lens[i]):
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] ** 2 <= waste * (area + lens[i] ** 2):
            groups[-1].append(i)
            area += lens[i] ** 2
        else:
            groups.append([i])
            area = lens[i] ** 2
    out = []
    for seqs in groups:
        seqs = sorted(seqs)
        tokens = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in seqs])
        in_order = bool(tokens[0] == 0 and tokens[-1] == len(tokens) - 1) and len(tokens) == offsets[-1]
        if len(seqs) == 1:
            out.append(_Group(seqs, tokens, None, None, None, in_order))
            continue
        tmax = max(lens[i] for i in seqs)
        ar = torch.arange(tmax)
        n = torch.tensor([lens[i] for i in seqs])
        real = ar[None, :] < n[:, None]  # [g, Tmax]
        start = torch.tensor([offsets[i] for i in seqs])
        gather = torch.where(real, start[:, None] + ar[None, :], start[:, None])
        mask = ((ar[:, None] >= ar[None, :])[None] & real[:, None, :])[:, None]
        take = (torch.arange(len(seqs))[:, None] * tmax + ar[None, :])[real]
        out.append(_Group(seqs, tokens, gather, mask, take, in_order))
    return out


def _cumsum(xs: Iterable[int]) -> Iterable[int]:
    total = 0
    for x in xs:
        total += x
        yield total
