"""HF <-> Megatron-core weight conversion for the Llama, Qwen2 and Qwen3 families, TP and PP sharded.

Pure functions over state dicts (name -> tensor); nothing here imports megatron-core, so the
mapping can be tested, and checkpoints converted, on a machine without it.

Notation
--------
``h`` hidden size, ``nh`` attention heads, ``ng`` key/value heads (query groups), ``d`` head
dim, ``f`` MLP intermediate size, ``V`` vocabulary, ``tp`` tensor-parallel size, ``pp`` pipeline
stages, ``L`` decoder layers.

The mapping, per decoder layer ``i`` (HF prefix ``model.layers.i.``, Megatron prefix
``decoder.layers.i.``; Megatron's local, non-Transformer-Engine layer spec):

====================================  =========================================  ==================
HF                                    Megatron                                   TP split
====================================  =========================================  ==================
input_layernorm.weight                input_layernorm.weight                     replicated
self_attn.{q,k,v}_proj.weight         self_attention.linear_qkv.weight           by query group
self_attn.{q,k,v}_proj.bias (Qwen2)   self_attention.linear_qkv.bias             by query group
self_attn.{q,k}_norm.weight (Qwen3)   self_attention.{q,k}_layernorm.weight      replicated
self_attn.o_proj.weight               self_attention.linear_proj.weight          columns (dim 1)
post_attention_layernorm.weight       pre_mlp_layernorm.weight                   replicated
mlp.{gate,up}_proj.weight             mlp.linear_fc1.weight                      rows, per half
mlp.down_proj.weight                  mlp.linear_fc2.weight                      columns (dim 1)
====================================  =========================================  ==================

plus ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight`` and ``lm_head.weight``
-> ``output_layer.weight`` (rows = vocabulary, split over TP; absent when tied), and
``model.norm.weight`` -> ``decoder.final_layernorm.weight``.

``linear_qkv`` interleaves by query group: for each group g of ``ng``, the ``nh/ng`` query heads
of g, then g's key head, then g's value head, each ``d`` rows: ``((nh + 2 ng) d, h)``. A TP rank
holds ``ng/tp`` whole groups, so its slice is contiguous. ``linear_fc1`` is ``[gate; up]``
(``(2f, h)``); a TP rank holds ``[gate_r; up_r]`` of its ``f/tp`` rows of each.

The vocabulary is padded with zero rows to a multiple of ``tp`` (Megatron splits it evenly);
the padding is dropped on the way back, and the backend slices logits to ``V`` so padded rows
never enter a softmax.

The critic (``role="critic"``) has HF's token-classification layout (``score.weight`` (1, h),
``score.bias`` (1,); ``rl/critic``'s value model) and Megatron name ``value_head.{weight,bias}``,
replicated over TP.

Pipeline stages: stage ``p`` of ``pp`` holds layers ``p L/pp .. (p+1) L/pp - 1`` (``L`` divisible by
``pp``, megatron-core's even split), numbered from 0 in its state dict as megatron-core numbers
them (``decoder.layers.j`` is HF layer ``p L/pp + j``). The first stage also holds the embedding;
the last the final norm and the output layer (or the value head). A tied model's last stage
(``pp > 1``) holds its own copy of the embedding as ``output_layer.weight``, as megatron-core
keeps it; on the way back the first stage's copy is the one read (the backend keeps the two
equal by summing their gradients).

RoPE: HF's ``rotate_half`` pairs dimension j with j + d/2, which is Megatron's default
(``rotary_interleaved=False``); only the default rope type (no scaling) is accepted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
VALUE_HEAD = "value_head"


class UnsupportedModel(ValueError):
    """The HF config describes an architecture (or an option of one) this conversion does not map."""


@dataclass(frozen=True)
class ArchSpec:
    """What the conversion and the Megatron model need to know about an HF decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def padded_vocab(self, tp: int) -> int:
        return int(math.ceil(self.vocab_size / tp) * tp)


def _rope(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "default":
        raise UnsupportedModel(f"rope type {rope_type!r} (only unscaled RoPE is converted)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise UnsupportedModel("the config names no rope_theta")
    return float(theta)


def arch_from_hf_config(cfg: Any) -> ArchSpec:
    """An ``ArchSpec`` from a transformers ``PretrainedConfig`` (Llama, Mistral, Qwen2, Qwen3).

    Raises UnsupportedModel naming the option that has no mapping (another family, MLP bias,
    an activation other than SiLU, scaled RoPE, Qwen2's sliding window).
    """
    family = getattr(cfg, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModel(f"model_type {family!r}; the megatron backend converts {', '.join(SUPPORTED_FAMILIES)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {cfg.hidden_act!r} (only SiLU-gated MLPs are converted)")
    if getattr(cfg, "mlp_bias", False):
        raise UnsupportedModel("mlp_bias=True")
    if getattr(cfg, "use_sliding_window", False) or (family == "mistral" and getattr(cfg, "sliding_window", None)):
        raise UnsupportedModel("sliding-window attention")
    nh = int(cfg.num_attention_heads)
    ng = int(getattr(cfg, "num_key_value_heads", None) or nh)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    if family == "qwen2":
        qkv_bias = True
    else:
        qkv_bias = bool(getattr(cfg, "attention_bias", False))
    return ArchSpec(
        family=family,
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        ffn_hidden_size=int(cfg.intermediate_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=ng,
        head_dim=int(head_dim),
        norm_eps=float(cfg.rms_norm_eps),
        rope_theta=_rope(cfg),
        max_position_embeddings=int(cfg.max_position_embeddings),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
    )


def check_tp(spec: ArchSpec, tp: int) -> None:
    """Raise ValueError if ``tp`` does not divide the heads, query groups and MLP width."""
    for what, n in (("num_key_value_heads", spec.num_kv_heads), ("num_attention_heads", spec.num_heads),
                    ("intermediate_size", spec.ffn_hidden_size)):
        if n % tp:
            raise ValueError(f"trainer.megatron.tensor_parallel_size={tp} does not divide the model's {what} ({n}); "
                             "pick a tensor-parallel size that divides it")


def check_pp(spec: ArchSpec, pp: int) -> None:
    """Raise ValueError if ``pp`` pipeline stages cannot split the decoder layers evenly."""
    if spec.num_layers % pp:
        raise ValueError(f"trainer.megatron.pipeline_parallel_size={pp} does not divide the model's "
                         f"num_hidden_layers ({spec.num_layers}); pick a pipeline-parallel size that divides it")


def stage_layers(spec: ArchSpec, pp: int, pp_rank: int) -> range:
    """The global (HF) indices of the decoder layers on pipeline stage ``pp_rank`` of ``pp``."""
    check_pp(spec, pp)
    n = spec.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


# ----------------------------------------------------------------------------- helpers


def _split(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return torch.chunk(t, tp, dim=dim)[rank].clone()


def _pad_vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    if w.shape[0] == padded:
        return w
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])], dim=0)


def _qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
    """q (nh d, ...), k, v (ng d, ...) -> (ng, (nh/ng + 2) d, ...) flattened to ((nh + 2 ng) d, ...)."""
    ng, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // ng
    rest = q.shape[1:]
    qg = q.reshape(ng, per * d, *rest)
    kg = k.reshape(ng, d, *rest)
    vg = v.reshape(ng, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _qkv_split(qkv: torch.Tensor, spec: ArchSpec, ng: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``_qkv_merge`` for ``ng`` groups (a TP shard holds ng/tp of them)."""
    d = spec.head_dim
    per = spec.num_heads // spec.num_kv_heads
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (per + 2) * d, *rest)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ----------------------------------------------------------------------------- HF -> Megatron


def hf_to_megatron(
    hf: dict[str, torch.Tensor], spec: ArchSpec, tp_size: int = 1, tp_rank: int = 0, role: str = "policy",
    pp_size: int = 1, pp_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """The Megatron state dict of TP rank ``tp_rank`` of ``tp_size`` on pipeline stage ``pp_rank``
    of ``pp_size`` from a full HF state dict.

    Args:
        hf: HF names -> tensors (a causal LM; ``role="critic"``: a token-classification value
            model whose ``score`` head becomes ``value_head``).
        spec: from ``arch_from_hf_config``.
    Returns:
        Megatron names -> new tensors (never views of ``hf``); layers numbered from 0 on the stage.
    Raises:
        KeyError naming the first HF weight that is missing.
    """
    # Only the stage's layers are converted (a stage of a large model never holds all of them).
    full = _hf_to_megatron_tp(hf, spec, tp_size, tp_rank, role, stage_layers(spec, pp_size, pp_rank))
    return stage_of(full, spec, pp_size, pp_rank, role)


def stage_of(full: dict[str, torch.Tensor], spec: ArchSpec, pp_size: int, pp_rank: int,
             role: str = "policy") -> dict[str, torch.Tensor]:
    """The part of a Megatron state dict (one TP rank's, global layer numbers) that stage
    ``pp_rank`` holds, its layers renumbered from 0 (the module docstring's "Pipeline stages")."""
    if pp_size == 1:
        return full
    layers = stage_layers(spec, pp_size, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: dict[str, torch.Tensor] = {}
    for k, v in full.items():
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            if int(i) in layers:
                out[f"decoder.layers.{int(i) - layers.start}.{rest}"] = v
        elif k.startswith("embedding."):
            if first:
                out[k] = v
        elif last:
            out[k] = v
    if last and role != "critic" and spec.tie_word_embeddings:
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"].clone()
    return out


def _hf_to_megatron_tp(
    hf: dict[str, torch.Tensor], spec: ArchSpec, tp_size: int, tp_rank: int, role: str, layers: range
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s weights of the decoder ``layers`` (global numbers), the embedding,
    the final norm and the head."""
    check_tp(spec, tp_size)
    base = "model."
    padded = spec.padded_vocab(tp_size)
    out: dict[str, torch.Tensor] = {}
    ng_r = spec.num_kv_heads // tp_size

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"HF weight {name!r} is missing (a {spec.family} checkpoint of {spec.num_layers} layers was expected)")
        return hf[name]

    out["embedding.word_embeddings.weight"] = _split(_pad_vocab(get(f"{base}embed_tokens.weight"), padded), tp_size, tp_rank, 0)
    for i in layers:
        h, m = f"{base}layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight").clone()
        qkv = _qkv_merge(get(h + "self_attn.q_proj.weight"), get(h + "self_attn.k_proj.weight"),
                         get(h + "self_attn.v_proj.weight"), spec)
        rows = qkv.shape[0] // spec.num_kv_heads * ng_r
        out[m + "self_attention.linear_qkv.weight"] = qkv[tp_rank * rows:(tp_rank + 1) * rows].clone()
        if spec.qkv_bias:
            b = _qkv_merge(get(h + "self_attn.q_proj.bias"), get(h + "self_attn.k_proj.bias"),
                           get(h + "self_attn.v_proj.bias"), spec)
            out[m + "self_attention.linear_qkv.bias"] = b[tp_rank * rows:(tp_rank + 1) * rows].clone()
        if spec.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = get(h + "self_attn.q_norm.weight").clone()
            out[m + "self_attention.k_layernorm.weight"] = get(h + "self_attn.k_norm.weight").clone()
        out[m + "self_attention.linear_proj.weight"] = _split(get(h + "self_attn.o_proj.weight"), tp_size, tp_rank, 1)
        out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight").clone()
        gate = _split(get(h + "mlp.gate_proj.weight"), tp_size, tp_rank, 0)
        up = _split(get(h + "mlp.up_proj.weight"), tp_size, tp_rank, 0)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[m + "mlp.linear_fc2.weight"] = _split(get(h + "mlp.down_proj.weight"), tp_size, tp_rank, 1)
    out["decoder.final_layernorm.weight"] = get(f"{base}norm.weight").clone()
    if role == "critic":
        out[f"{VALUE_HEAD}.weight"] = get("score.weight").clone()
        out[f"{VALUE_HEAD}.bias"] = get("score.bias").clone()
    elif not spec.tie_word_embeddings:
        out["output_layer.weight"] = _split(_pad_vocab(get("lm_head.weight"), padded), tp_size, tp_rank, 0)
    return out


# ----------------------------------------------------------------------------- Megatron -> HF


def megatron_to_hf(shards: list[dict[str, torch.Tensor]] | list[list[dict[str, torch.Tensor]]], spec: ArchSpec,
                   role: str = "policy") -> dict[str, torch.Tensor]:
    """The full HF state dict from the Megatron state dicts of every TP rank (index = TP rank),
    or, pipelined, of every stage and TP rank (``shards[pp_rank][tp_rank]``).

    The inverse of ``hf_to_megatron``: ``megatron_to_hf([[hf_to_megatron(hf, s, tp, r, pp_size=pp,
    pp_rank=p) for r in range(tp)] for p in range(pp)], s) == hf`` exactly (and the flat list
    ``[hf_to_megatron(hf, s, tp, r) for r in range(tp)]`` for one stage). Tied models get
    ``lm_head.weight`` as the same tensor as ``model.embed_tokens.weight`` (what
    ``save_pretrained`` expects of a tied model).
    """
    if shards and not isinstance(shards[0], dict):
        stages: list[list[dict[str, torch.Tensor]]] = shards  # type: ignore[assignment]
        shards = [merge_stages([stage[r] for stage in stages], spec, role) for r in range(len(stages[0]))]
    tp = len(shards)
    check_tp(spec, tp)
    ng_r = spec.num_kv_heads // tp

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=dim)

    def one(name: str) -> torch.Tensor:
        return shards[0][name].clone()

    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = cat("embedding.word_embeddings.weight", 0)[: spec.vocab_size].clone()
    for i in range(spec.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = one(m + "input_layernorm.weight")
        parts = [_qkv_split(s[m + "self_attention.linear_qkv.weight"], spec, ng_r) for s in shards]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[h + f"self_attn.{name}.weight"] = torch.cat([p[j] for p in parts], dim=0)
        if spec.qkv_bias:
            parts = [_qkv_split(s[m + "self_attention.linear_qkv.bias"], spec, ng_r) for s in shards]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[h + f"self_attn.{name}.bias"] = torch.cat([p[j] for p in parts], dim=0)
        if spec.qk_norm:
            out[h + "self_attn.q_norm.weight"] = one(m + "self_attention.q_layernorm.weight")
            out[h + "self_attn.k_norm.weight"] = one(m + "self_attention.k_layernorm.weight")
        out[h + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", 1)
        out[h + "post_attention_layernorm.weight"] = one(m + "pre_mlp_layernorm.weight")
        halves = [torch.chunk(s[m + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
        out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves], dim=0)
        out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves], dim=0)
        out[h + "mlp.down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", 1)
    out["model.norm.weight"] = one("decoder.final_layernorm.weight")
    if role == "critic":
        out["score.weight"] = one(f"{VALUE_HEAD}.weight")
        out["score.bias"] = one(f"{VALUE_HEAD}.bias")
    elif spec.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = cat("output_layer.weight", 0)[: spec.vocab_size].clone()
    return out


def merge_stages(stages: list[dict[str, torch.Tensor]], spec: ArchSpec, role: str = "policy") -> dict[str, torch.Tensor]:
    """One TP rank's whole-model state dict from its state dict on each pipeline stage (index =
    stage): layers renumbered globally; a tied model's last-stage copy of the embedding dropped."""
    pp = len(stages)
    if pp == 1:
        return stages[0]
    out: dict[str, torch.Tensor] = {}
    for p, stage in enumerate(stages):
        offset = stage_layers(spec, pp, p).start
        for k, v in stage.items():
            if k.startswith("decoder.layers."):
                i, rest = k[len("decoder.layers."):].split(".", 1)
                k = f"decoder.layers.{int(i) + offset}.{rest}"
            elif k == "output_layer.weight" and role != "critic" and spec.tie_word_embeddings:
                continue
            if k in out:
                raise ValueError(f"merge_stages: {k} is on two pipeline stages")
            out[k] = v
    return out


# With Transformer Engine's layer spec the two pre-norms are fused into the linear that follows
# them and named after it (as in megatron-core's own modelopt state-dict hooks).
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def to_te_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local-spec Megatron names -> Transformer-Engine-spec names (the same tensors)."""
    out = {}
    for k, v in state.items():
        for local, te in TE_RENAMES.items():
            if k.startswith("decoder.layers.") and k.endswith("." + local):
                k = k[: -len(local)] + te
                break
        out[k] = v
    return out


def from_te_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_te_names``."""
    out = {}
    for k, v in state.items():
        for local, te in TE_RENAMES.items():
            if k.startswith("decoder.layers.") and k.endswith("." + te):
                k = k[: -len(te)] + local
                break
        out[k] = v
    return out


def hf_num_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors of a state dict (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in state.values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())
