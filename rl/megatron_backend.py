"""The Megatron-core ``TrainerBackend``: one rank of a tensor-, pipeline- and context-parallel policy, critic or reference.

It implements ``rl.backend.TrainerBackend`` (read its conventions first) on megatron-core's
``GPTModel`` built from an HF config (Llama, Mistral, Qwen2 with its qkv bias, Qwen3 with its
qk-norm; ``rl.megatron_convert`` maps the weights both ways). The driver cannot tell it from the
DeepSpeed backend: same samples in, same per-token outputs, same ``loss_fn`` out of
``rl.ppo``, HF safetensors out for the engines.

Parallelism
-----------
``world_size`` ranks = ``tensor_parallel_size`` x ``context_parallel_size`` x data-parallel x
``pipeline_parallel_size``, in megatron-core's rank order (``tp-cp-ep-dp-pp``, TP fastest): global
rank ``r`` has TP rank ``r % tp``, CP rank ``(r // tp) % cp``, DP rank ``(r // (tp cp)) % dp``
(``replica_of``) and pipeline stage ``r // (tp cp dp)``. All ranks of one replica (its TP and CP
ranks on every stage) are handed the same samples (``rl.trainer_actor.data_parallel_ranks`` shards
by the same formula), return the same outputs, and only TP rank 0, CP rank 0 of the first stage
(the replica's lowest rank) reports; the backend checks that a replica's stages and CP ranks hold
the same samples.

Pipeline parallel: stage ``p`` builds layers ``p L/pp .. (p+1) L/pp - 1`` (``L`` divisible by
``pp``; ``rl.megatron_convert`` maps them with the stage's offset), the first stage also the
embedding, the last the final norm and the output layer (or value head). Micro-batches go
through megatron-core's non-interleaved 1F1B schedule (``get_forward_backward_func``), the
activations and their gradients sent point to point between stages (NCCL on GPUs, gloo in the
CPU tests) with ``variable_seq_lengths`` (micro-batches differ in shape). Every stage collates
the same micro-batches (it needs the mask); ``loss_fn`` runs on the last stage, and the per-token
outputs or metrics are broadcast from there to the whole pipeline group. A tied model's last
stage holds its own copy of the embedding (megatron-core's layout): the two copies' gradients
are summed over the embedding group each step, so they stay equal. Exports and
``state_dict_for_engine`` gather every stage (and TP rank) into the whole model; ``save`` writes
each rank's stage shard and ``load`` reads it back. PP=2 is tested equal to PP=1.

Context parallel (``context_parallel_size`` = cp > 1; Transformer Engine's layer spec only, as
megatron-core implements it only in TE's attention): every micro-batch is laid out as megatron
does (``CPLayout``): each sequence (a right-padded row, or with ``pack_sequences`` each
sub-trace, THD) padded to a multiple of 2 cp and cut into 2 cp chunks, CP rank i keeping chunks i
and 2cp-1-i so that causal attention costs every rank the same. TE's attention exchanges keys and
values within the CP group (p2p ring) and megatron's RoPE takes the same chunks of the positions.
Each rank computes the per-token outputs of its own slots from its own logits (the next token of
a slot is given explicitly: ``next_token_logprobs_and_entropy``), all-gathers these (n,) vectors
over the CP group and puts them back in sequence order (``cp_gather``): every CP rank then holds
the whole micro-batch's outputs and runs ``loss_fn`` unchanged (the minibatch's token
normalisation as without CP), but the gradient flows only into its own slots (the other ranks'
values arrive detached), so the CP ranks' parameter gradients are disjoint shares of the whole
one: they are summed over megatron's DP-with-CP group, after which every CP rank holds the same
gradient and the norm counts it once. The index arithmetic (pure functions ``cp_positions``,
``cp_partition_index``, ``cp_restore``, ``CPLayout``) and the gather's gradient (two gloo
processes) are tested on CPU; the model under CP is not: it needs TE on GPUs, and this was
written against megatron-core 0.16's API on a machine with neither (not run). Combined with PP it
follows the same path on the last stage (also not run).

Gradients
---------
As in ``rl.backend``: the loss is normalised for the whole minibatch, so gradients are summed
over micro-batches (plain accumulation in ``.grad``) and over DP ranks (one all-reduce SUM over
the DP group per step). TP-sharded weights hold disjoint slices; replicated ones (norms, the
value head) get identical gradients on every TP rank. The global gradient norm counts each
sharded slice once per TP rank and each replicated weight once, summed over the pipeline stages
(a tied embedding's last-stage copy, megatron's ``shared`` weight, is not counted twice).

Sequences
---------
A micro-batch (planned by ``deepspeed_backend.plan_micro_batches``, the same plan as DeepSpeed)
is either right-padded rows (``pack_sequences=False``) or packed into one row
(``pack_sequences=True``), so that no token attends across two sub-traces. With the local
layer spec (CPU tests, or GPUs without Transformer Engine) packing uses a block-diagonal causal
mask: RoPE scores depend only on the distance between query and key, so a sequence packed at
offset o gives the same result as at offset 0 (up to float rounding; the equivalence is
tested). With Transformer Engine's spec (``trainer.megatron.transformer_engine``, GPUs) it is
THD packing with ``cu_seqlens`` (not run on this CPU machine).

Log-probabilities and entropies: at TP 1 from ``deepspeed_backend.token_logprobs_and_entropy``,
the DeepSpeed backend's own kernel, on logits cut to the true vocabulary. At TP > 1 the logits
stay sharded by vocabulary and ``rl.megatron_logprobs`` computes the same quantities with three
all-reduces of per-token vectors (no rank ever holds the full ``(tokens, vocab)`` logits); TP=2
is tested equal to TP=1.

Devices
-------
On GPUs it runs megatron-core unmodified (NCCL). On a CPU, megatron-core needs shims
(``tests/support/megatron_cpu.py``: CUDA device and RNG calls in the model, and in the pipeline
schedule and its p2p communicator) that relayrl does not ship in its product path; without them
this backend refuses to start with a message saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from relayrl.config import ConfigError, OptimConfig, TrainerConfig
from relayrl.rl import distributed
from relayrl.rl.distributed import replica_of  # noqa: F401  (part of this module's API)
from relayrl.rl.backend import LossFn, MicroBatch, Role, Sample
from relayrl.rl.checkpoint import overwrite_safetensors
from relayrl.rl.deepspeed_backend import (
    _as_dtype,
    _fsync_dir,
    _fsync_tree,
    _rng_state,
    _set_rng_state,
    _warmup_factor,
    collate,
    copy_tokenizer_files,
    plan_micro_batches,
    token_logprobs_and_entropy,
)
from relayrl.rl.megatron_logprobs import vocab_parallel_logprobs_and_entropy
from relayrl.rl.megatron_convert import (
    VALUE_HEAD,
    ArchSpec,
    arch_from_hf_config,
    check_pp,
    from_te_names,
    hf_to_megatron,
    megatron_to_hf,
    to_te_names,
)

CHECKPOINT_FORMAT = 1
_META = "relayrl_backend.json"


# ----------------------------------------------------------------------------- pure helpers


def causal_mask(lengths: list[int], T: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's attention mask for right-padded rows: (b, 1, T, T) bool, True = masked.

    Query i of row j may see key k iff k <= i and k < lengths[j].
    """
    i = torch.arange(T, device=device)
    future = i[None, :] > i[:, None]  # (T, T): key after query
    pad = i[None, :] >= torch.tensor(lengths, device=device)[:, None]  # (b, T): padded key
    return (future[None] | pad[:, None, :])[:, None]


def packed_mask(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Block-diagonal causal mask of sequences packed into one row: (1, 1, S, S) bool, True = masked.

    S = sum(lengths). Query i may see key k iff both lie in the same sequence and k <= i.
    """
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    S = int(seq.shape[0])
    i = torch.arange(S, device=device)
    allowed = (seq[:, None] == seq[None, :]) & (i[None, :] <= i[:, None])
    return (~allowed)[None, None]


def pack_index(lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that move a packed row (S,) to padded rows (b, T) and back.

    Returns:
        flat_padded: (S,) positions ``j * T + t`` in the flattened (b*T) padded layout, one per
            packed token, in packing order.
        flat_packed: the same tokens' positions in the packed row, i.e. ``arange(S)``.
    """
    rows = [torch.arange(n) + j * T for j, n in enumerate(lengths)]
    flat_padded = torch.cat(rows)
    return flat_padded, torch.arange(flat_padded.shape[0])


# ----------------------------------------------------------------------------- context parallel
#
# Megatron-core's sequence split for context parallel (``get_batch_on_this_cp_rank``, and TE's
# ``thd_get_partitioned_indices`` for packed sequences): each sequence, its length padded to a
# multiple of 2 cp, is cut into 2 cp equal chunks and CP rank i keeps chunks i and 2cp-1-i. Under
# a causal mask the late chunks cost more attention than the early ones; pairing them gives every
# rank the same work. Notation: ``cp`` ranks, a micro-batch of ``b`` rows of ``T`` (right-padded),
# the CP layout of ``S`` slots (the sequences end to end, each padded), ``n = S / cp`` slots per rank.


def cp_padded_length(n: int, cp: int) -> int:
    """``n`` rounded up to a multiple of ``2 cp`` (so that it cuts into 2 cp equal chunks)."""
    return -(-n // (2 * cp)) * (2 * cp)


def cp_positions(length: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The positions of one sequence of ``length`` (a multiple of 2 cp) that CP rank ``cp_rank``
    keeps: chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` of 2 cp, in order. (length / cp,) long.

    E.g. length 8, cp 2: rank 0 keeps [0, 1, 6, 7], rank 1 keeps [2, 3, 4, 5].
    """
    if length % (2 * cp):
        raise ValueError(f"cp_positions: length {length} is not a multiple of 2 x cp ({2 * cp}); pad it first")
    c = length // (2 * cp)
    early = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    late = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c)
    return torch.cat([early, late])


def cp_partition_index(padded_lengths: list[int], cp: int, cp_rank: int) -> torch.Tensor:
    """Sequences laid end to end (THD), each of a length divisible by 2 cp: the positions CP rank
    ``cp_rank`` keeps, sequence after sequence (what TE's ``thd_get_partitioned_indices`` returns
    for ``cu_seqlens_padded``). (sum(padded_lengths) / cp,) long."""
    out, offset = [], 0
    for n in padded_lengths:
        out.append(offset + cp_positions(n, cp, cp_rank))
        offset += n
    return torch.cat(out)


def cp_restore(pieces: list[torch.Tensor], padded_lengths: list[int]) -> torch.Tensor:
    """The CP group's pieces (rank 0's, rank 1's, ...: each (n, ...) in ``cp_partition_index``
    order) back in sequence order, (S, ...). The concatenated pieces' positions are a permutation
    of ``range(S)``; indexing by its inverse (``argsort``) undoes it, and is differentiable in
    every piece."""
    cp = len(pieces)
    order = torch.cat([cp_partition_index(padded_lengths, cp, r) for r in range(cp)])
    return torch.cat(pieces)[torch.argsort(order).to(pieces[0].device)]


class CPLayout:
    """A micro-batch in the CP layout, and this rank's share of it.

    ``packed``: each sub-trace is one sequence (THD, ``cu_seqlens``); else each of the ``b``
    rows of ``T`` is one (BSHD, all rows padded alike). Each sequence is padded from its real
    length to a multiple of 2 cp.

    Attributes:
        padded_lengths: per sequence, its length in the layout.
        real_lengths: per sequence, the micro-batch tokens it holds (sub-trace length, or T).
        slots: (S,) long, the position ``j T + t`` in the micro-batch's flattened (b, T) rows of
            each slot, or -1 for a slot of CP padding.
        local: (n,) long, the slots this rank keeps (``cp_partition_index``).
    """

    def __init__(self, lengths: list[int], T: int, cp: int, cp_rank: int, packed: bool) -> None:
        self.b, self.T, self.cp, self.cp_rank, self.packed = len(lengths), T, cp, cp_rank, packed
        self.real_lengths = list(lengths) if packed else [T] * len(lengths)
        self.padded_lengths = [cp_padded_length(n, cp) for n in self.real_lengths]
        self.slots = torch.cat([torch.cat([torch.arange(n) + j * T, torch.full((p - n,), -1)])
                                for j, (n, p) in enumerate(zip(self.real_lengths, self.padded_lengths, strict=True))])
        self.local = cp_partition_index(self.padded_lengths, cp, cp_rank)

    def local_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) this rank's token ids in layout order (CP padding: token 0, never attended to
        by a real token: it lies after its sequence's last one). tokens: (b, T)."""
        s = self.slots[self.local].to(tokens.device)
        return torch.where(s >= 0, tokens.reshape(-1)[s.clamp(min=0)], torch.zeros_like(s))

    def local_positions(self) -> torch.Tensor:
        """(n,) each kept slot's position within its sequence."""
        return torch.cat([torch.arange(p) for p in self.padded_lengths])[self.local]

    def local_next_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) the token each kept slot's logits predict: ``tokens[j, t + 1]`` for slot
        ``(j, t)`` (0 after a row's last position, and for CP padding). tokens: (b, T)."""
        nxt = torch.zeros_like(tokens)
        nxt[:, :-1] = tokens[:, 1:]
        return self.local_tokens(nxt)

    def to_rows(self, values: torch.Tensor, shift: bool) -> torch.Tensor:
        """(S,) values in layout order -> (b, T) rows (CP padding dropped). ``shift``: the
        values are about the next token (slot t's logits predict token t+1), so they move one
        position right, position 0 getting 0.0 (``token_logprobs_and_entropy``'s convention)."""
        real = self.slots >= 0
        s = self.slots[real].to(values.device)
        rows = values.new_zeros(self.b * self.T).index_copy(0, s, values[real.to(values.device)])
        rows = rows.reshape(self.b, self.T)
        if shift:
            rows = torch.cat([rows.new_zeros(self.b, 1), rows[:, :-1]], dim=1)
        return rows


def cp_gather(local: torch.Tensor, layout: CPLayout, group) -> torch.Tensor:
    """All-gather a per-slot vector over the CP group and restore sequence order: (n,) -> (S,).

    The other ranks' pieces arrive detached; this rank's keeps its graph. A loss on the result
    (identical on every CP rank) therefore backpropagates only through this rank's own tokens,
    and the sum of the CP ranks' gradients is the whole loss's gradient (chain rule over the
    disjoint pieces): why gradients are summed over the data-parallel-with-CP group."""
    pieces = [torch.empty_like(local) for _ in range(layout.cp)]
    dist.all_gather(pieces, local.detach().contiguous(), group=group)
    pieces[layout.cp_rank] = local
    return cp_restore(pieces, layout.padded_lengths)


def next_token_logprobs_and_entropy(fn, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets[i]`` and entropy under ``logits[i]``, for every i: (n,), (n,).

    ``fn(logits (1, t, k), tokens (1, t))`` is ``token_logprobs_and_entropy``'s signature
    (or the vocabulary-parallel one): its position i is about ``tokens[i]`` under ``logits[i-1]``,
    and position 0 is 0.0. On a CP rank the next token of a slot is not the next slot, so the
    targets are given: fed ``(0, targets[:-1])`` it returns slots 0..n-2 at positions 1..n-1;
    the last slot comes from a second call on its row alone (two rows, so that no (n, k) copy
    of the logits is made). logits: (n, k); targets: (n,).
    """
    zero = targets.new_zeros(1)
    lp, ent = fn(logits[None], torch.cat([zero, targets[:-1]])[None])
    lp_last, ent_last = fn(logits[-1:].expand(2, -1)[None], torch.cat([zero, targets[-1:]])[None])
    return torch.cat([lp[0, 1:], lp_last[0, 1:]]), torch.cat([ent[0, 1:], ent_last[0, 1:]])


def cp_needs_te(cp: int) -> str:
    """The error for context parallel where Transformer Engine or CUDA is missing."""
    return (f"trainer.megatron.context_parallel_size={cp}: context parallel needs Transformer Engine on CUDA "
            "GPUs (megatron-core splits the sequence only in TE's attention), and this machine has no CUDA or no "
            "transformer_engine; install transformer_engine on the GPU nodes, or set "
            "trainer.megatron.context_parallel_size=1")


def _loss_record(loss: torch.Tensor, metrics: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch's loss and metrics as plain floats (what a step sums)."""
    return {"loss": float(loss.detach()),
            "metrics": {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}}


def _require_device() -> None:
    if torch.cuda.is_available():
        return
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        raise RuntimeError(
            "trainer.backend=megatron needs CUDA GPUs: megatron-core places tensors with "
            "torch.cuda.current_device(). On a CPU use trainer.backend=deepspeed (the tests run "
            "megatron-core on CPU through the shims in tests/support/megatron_cpu.py)."
        ) from None


class ValueHead(torch.nn.Module):
    """The critic's scalar head in place of GPTModel's output layer: ``Linear(h, 1)``, replicated
    over TP. Called like a Megatron linear (``(x, weight=None, runtime_gather_output=None)`` ->
    ``(out, bias)``), so GPTModel's post-processing runs unchanged and returns (b, s, 1)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = False

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: Any = None):
        return torch.nn.functional.linear(x, self.weight, self.bias), None


def use_transformer_engine(setting: bool | str) -> bool:
    """``trainer.megatron.transformer_engine`` resolved: ``auto`` = installed and CUDA available."""
    import importlib.util

    if setting is False:
        return False
    have = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    if setting is True and not have:
        raise RuntimeError("trainer.megatron.transformer_engine=true needs transformer_engine installed and CUDA "
                           "GPUs; set it to auto or false")
    return have


def build_gpt_model(spec: ArchSpec, tp: int, dtype: torch.dtype, role: Role, te: bool = False,
                    recompute: bool = False, vocab_parallel: bool = False, pp: int = 1,
                    pre_process: bool = True, post_process: bool = True, cp: int = 1) -> torch.nn.Module:
    """megatron-core's GPTModel for ``spec`` (parallel state initialised), with Transformer
    Engine's layer spec (``te``) or the local one; ``recompute``: full activation recomputation
    of every layer in backward (``trainer.gradient_checkpointing``; megatron's checkpoint saves
    CUDA RNG states, so it runs on GPUs only, not through the CPU test shims).

    With ``pp`` stages it is this rank's stage: megatron-core builds the stage's share of the
    layers (from the parallel state's PP rank); ``pre_process`` (first stage) adds the embedding,
    ``post_process`` (last stage) the final norm and the output layer (the value head).

    ``cp`` > 1: context parallel, which megatron-core implements in Transformer Engine's
    attention only (``te``; the local spec's attention asserts cp == 1): each rank's attention
    exchanges keys and values with the CP group (``cp_comm_type`` p2p, megatron's default)."""
    if cp > 1 and not te:
        raise ValueError("context parallel needs Transformer Engine's layer spec (te=True)")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        # Stages exchange (s, b, h) activations of the parameters' dtype; micro-batches differ in
        # length, so the schedule sends each one's shape first.
        pipeline_dtype=dtype,
        variable_seq_lengths=pp > 1,
        # A MoE-only setting (these models are dense); its default, allgather, is refused with
        # variable_seq_lengths by TransformerConfig's checks.
        moe_token_dispatcher_type="alltoall",
        # The schedule then leaves the loss as ``loss_fn`` made it (normalised for the whole
        # minibatch, rl.backend) instead of dividing it by micro-batch or token counts.
        calculate_per_token_loss=True,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        # Fusions are CUDA kernels (or TE); the unfused paths are exact and run anywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
           if recompute else {}),
    )
    tie = spec.tie_word_embeddings and role != "critic"
    layer_spec = (get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm) if te
                  else get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm))
    model = GPTModel(
        config,
        layer_spec,
        vocab_size=spec.padded_vocab(tp),
        max_sequence_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        share_embeddings_and_output_weights=tie,
        parallel_output=vocab_parallel,  # False: logits gathered over TP, then cut to the true vocabulary
        pre_process=pre_process,
        post_process=post_process,
    )
    if role == "critic" and post_process:
        model.output_layer = ValueHead(spec.hidden_size, dtype)
    return model


# ----------------------------------------------------------------------------- the backend


class MegatronBackend:
    """One rank of a Megatron-core policy, critic, or frozen reference.

    Args: as ``DeepSpeedBackend`` (role, model_path, trainer_cfg, optim_cfg, dtype, rank,
    world_size, seed); parallel sizes come from ``trainer_cfg.megatron``.
    """

    def __init__(
        self,
        role: Role,
        model_path: str | os.PathLike[str],
        trainer_cfg: TrainerConfig,
        optim_cfg: OptimConfig | None = None,
        dtype: str | torch.dtype = "float32",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        from transformers import AutoConfig

        if role not in ("policy", "critic", "reference"):
            raise ValueError(f"role: {role!r} is not one of policy, critic, reference")
        _require_device()
        self.role: Role = role
        self.model_path = str(model_path)
        self.trainer_cfg = trainer_cfg
        self.optim_cfg = optim_cfg or (trainer_cfg.critic if role == "critic" else trainer_cfg.policy)
        self.dtype = _as_dtype(dtype)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.tp = trainer_cfg.megatron.tensor_parallel_size
        self.pp = trainer_cfg.megatron.pipeline_parallel_size
        self.cp = trainer_cfg.megatron.context_parallel_size
        if world_size % (self.tp * self.pp * self.cp):
            raise ValueError(f"trainer.world_size={world_size} is not a multiple of trainer.megatron."
                             f"tensor_parallel_size x pipeline_parallel_size x context_parallel_size "
                             f"({self.tp} x {self.pp} x {self.cp})")
        self.global_step = 0

        self.te = use_transformer_engine(trainer_cfg.megatron.transformer_engine)
        if self.cp > 1 and not self.te:
            raise ConfigError(cp_needs_te(self.cp))
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.spec = arch_from_hf_config(self.hf_config)
        check_pp(self.spec, self.pp)
        distributed.init_distributed(rank, world_size)
        self._init_parallel_state()
        self.device = distributed.device()

        torch.manual_seed(seed)
        hf_state = self._hf_state(self.model_path)  # a fresh critic head draws first, as DeepSpeed's does
        self.vocab_parallel = self.tp > 1 and role != "critic"
        self.model = build_gpt_model(self.spec, self.tp, self.dtype, role, self.te,
                                     recompute=trainer_cfg.gradient_checkpointing and role != "reference",
                                     vocab_parallel=self.vocab_parallel, pp=self.pp, pre_process=self.first_stage,
                                     post_process=self.last_stage, cp=self.cp).to(self.device)
        from megatron.core import parallel_state as ps

        # A tied embedding's two copies (first and last stage), whose gradients are summed.
        tied_over_stages = self.pp > 1 and self.model.share_embeddings_and_output_weights
        self.embedding_group = ps.get_embedding_group() if tied_over_stages and ps.is_rank_in_embedding_group() else None
        self._load_hf(hf_state)
        self.model.eval()
        self.optimizer = self.scheduler = None
        if role == "reference":
            self.model.requires_grad_(False)
        else:
            o = self.optim_cfg
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad],
                lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, foreach=False,
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_factor(o.warmup_steps))

    # -- construction

    def _init_parallel_state(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        if ps.model_parallel_is_initialized():
            sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                     ps.get_context_parallel_world_size())
            if sizes != (self.tp, self.pp, self.cp):
                raise ValueError("two megatron backends in one process must use the same tensor_parallel_size, "
                                 "pipeline_parallel_size and context_parallel_size")
        else:
            ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                         context_parallel_size=self.cp)
            tensor_parallel.model_parallel_cuda_manual_seed(self.seed)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.cp_rank = ps.get_context_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.cp_group = ps.get_context_parallel_group()
        # Gradients are summed over the replicas and, within one, over its CP ranks (each holds
        # the gradient of its own tokens' share of the loss): megatron's DP-with-CP group.
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.first_stage, self.last_stage = self.pp_rank == 0, self.pp_rank == self.pp - 1

    def _hf_state(self, path: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (the megatron backend reads HF safetensors)")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        if self.role != "critic" and "lm_head.weight" not in state and self.spec.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        if self.role == "critic" and "score.weight" not in state:
            # A causal-LM checkpoint: a fresh head drawn exactly as ``critic.value_model`` (HF's
            # init) draws it, normal(0, initializer_range) and a zero bias, as the first draw from
            # torch's global RNG after ``manual_seed(seed)``: the same head as DeepSpeed's critic.
            std = float(getattr(self.hf_config, "initializer_range", 0.02))
            state["score.weight"] = torch.empty(1, self.spec.hidden_size).normal_(0.0, std)
            state["score.bias"] = torch.zeros(1)
        return state

    def _load_hf(self, hf_state: dict[str, torch.Tensor]) -> None:
        shard = hf_to_megatron(hf_state, self.spec, self.tp, self.tp_rank, role=self.role, pp_size=self.pp,
                               pp_rank=self.pp_rank)
        if self.te:
            shard = to_te_names(shard)
        if self.role == "critic":
            shard = {k.replace(f"{VALUE_HEAD}.", "output_layer."): v for k, v in shard.items()}
        own = {k for k in self.model.state_dict() if not k.endswith("_extra_state")}
        if set(shard) != own:
            raise RuntimeError(f"weight names differ from the model's: missing {sorted(own - set(shard))[:5]}, "
                               f"unexpected {sorted(set(shard) - own)[:5]}")
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in shard.items():
                params[k].copy_(v.to(params[k].dtype))

    # -- micro-batches

    def _plan(self, samples: list[Sample]) -> list[list[int]]:
        lengths = [int(s["tokens"].shape[0]) for s in samples]
        if any(n < 1 for n in lengths):
            raise ValueError("a sample has an empty 'tokens' tensor; every sample needs at least one token")
        return plan_micro_batches(lengths, self.trainer_cfg.micro_batch_size, self.trainer_cfg.max_tokens_per_micro_batch)

    def _model_inputs(self, mb: MicroBatch) -> tuple[dict[str, Any], torch.Tensor | CPLayout | None]:
        """GPTModel's keyword arguments for a micro-batch, and how its outputs go back to padded
        rows: the index that moves packed outputs there, None for right-padded rows, or the
        ``CPLayout`` under context parallel (``_cp_inputs``).

        Local spec: right-padded rows under ``causal_mask``, or one packed row under
        ``packed_mask``. Transformer Engine (GPU): right-padded rows need no mask, TE's attention
        is causal (the spec's mask type) and a real token never sees a later, padded one; packed
        is the THD layout, one row of all tokens, ``cu_seqlens`` marking where each sub-trace
        starts (RoPE and attention restart there)."""
        if self.cp > 1:
            return self._cp_inputs(mb)
        tokens = mb["tokens"]
        b, T = tokens.shape
        lengths = mb["attention_mask"].sum(-1).tolist()
        if not (self.trainer_cfg.megatron.pack_sequences and b > 1):
            pos = torch.arange(T, device=tokens.device)[None].expand(b, T)
            mask = None if self.te else causal_mask(lengths, T, tokens.device)
            return {"input_ids": tokens, "position_ids": pos, "attention_mask": mask}, None
        to_padded, _ = pack_index(lengths, T)
        to_padded = to_padded.to(tokens.device)
        row = tokens.reshape(-1)[to_padded][None]
        if not self.te:
            pos = torch.arange(row.shape[1], device=tokens.device)[None]
            return {"input_ids": row, "position_ids": pos, "attention_mask": packed_mask(lengths, tokens.device)}, to_padded
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.zeros(b + 1, dtype=torch.int32, device=tokens.device)
        cu[1:] = torch.cumsum(torch.tensor(lengths, device=tokens.device), 0)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        pos = torch.cat([torch.arange(n, device=tokens.device) for n in lengths])[None]
        return {"input_ids": row, "position_ids": pos, "attention_mask": None, "packed_seq_params": params}, to_padded

    def _cp_inputs(self, mb: MicroBatch) -> tuple[dict[str, Any], CPLayout]:
        """GPTModel's inputs for this CP rank's share of a micro-batch (Transformer Engine only).

        Right-padded rows: every row padded to ``cp_padded_length(T)``, this rank's columns kept
        (megatron's ``get_batch_on_this_cp_rank``); the model's RoPE takes the same chunks of
        the positions (``get_pos_emb_on_this_cp_rank``). Packed (THD): each sub-trace padded to a
        multiple of 2 cp, this rank's slots of each kept (``thd_get_partitioned_indices``);
        ``cu_seqlens`` hold the real lengths, ``cu_seqlens_*_padded`` where each padded sequence
        starts (TE's attention and megatron's THD RoPE split each sequence by the padded ones)."""
        tokens = mb["tokens"]
        b, T = tokens.shape
        lengths = mb["attention_mask"].sum(-1).tolist()
        packed = self.trainer_cfg.megatron.pack_sequences and b > 1
        layout = CPLayout(lengths, T, self.cp, self.cp_rank, packed)
        ids = layout.local_tokens(tokens)
        pos = layout.local_positions().to(tokens.device)
        if not packed:
            return {"input_ids": ids.reshape(b, -1), "position_ids": pos.reshape(b, -1), "attention_mask": None}, layout
        from megatron.core.packed_seq_params import PackedSeqParams

        def cumulative(ns: list[int]) -> torch.Tensor:
            cu = torch.zeros(len(ns) + 1, dtype=torch.int32, device=tokens.device)
            cu[1:] = torch.cumsum(torch.tensor(ns, device=tokens.device), 0)
            return cu

        cu, cu_padded = cumulative(layout.real_lengths), cumulative(layout.padded_lengths)
        longest = max(layout.padded_lengths)  # RoPE's table must cover the padded sequences
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                                 cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest)
        return {"input_ids": ids[None], "position_ids": pos[None], "attention_mask": None,
                "packed_seq_params": params}, layout

    def _last_stage_outputs(self, out: torch.Tensor, mb: MicroBatch, layout: torch.Tensor | CPLayout | None,
                            temperature: float) -> dict[str, torch.Tensor]:
        """The per-token outputs of ``rl.backend`` ((b, T) each) from the last stage's model output."""
        if isinstance(layout, CPLayout):
            return self._cp_outputs(out, mb, layout, temperature)
        return self._outputs(self._padded_out(out, mb, layout), mb, temperature)

    def _cp_outputs(self, out: torch.Tensor, mb: MicroBatch, layout: CPLayout, temperature: float) -> dict[str, torch.Tensor]:
        """As ``_outputs``, from this CP rank's share of the model output, (b, n / b, k) or
        (1, n, k): per-token values are computed on the rank's own slots (the logits never
        leave it), all-gathered over the CP group as (n,) vectors and put back in sequence order,
        identical on every CP rank, with gradients flowing into this rank's own slots only."""
        local = out.reshape(-1, out.shape[-1])[:, : self._width()]  # (n, k) in layout.local order
        m = mb["attention_mask"]
        if self.role == "critic":
            values = layout.to_rows(cp_gather(local[:, 0].float(), layout, self.cp_group), shift=False)
            return {"values": values * m.float()}
        targets = layout.local_next_tokens(mb["tokens"])
        lp, ent = next_token_logprobs_and_entropy(self._logprobs_fn(temperature), local, targets)
        logprobs = layout.to_rows(cp_gather(lp, layout, self.cp_group), shift=True)
        entropy = layout.to_rows(cp_gather(ent, layout, self.cp_group), shift=True)
        mf = m.to(logprobs.dtype)
        return {"logprobs": logprobs * mf, "entropy": entropy * mf}

    def _logprobs_fn(self, temperature: float):
        """``(logits (b, t, k), tokens (b, t)) -> (logprobs, entropy)``: the DeepSpeed backend's
        kernel on the true vocabulary, or at TP > 1 the vocabulary-parallel one."""
        if not self.vocab_parallel:
            return lambda logits, tokens: token_logprobs_and_entropy(logits, tokens, temperature)
        start = self.tp_rank * (self.spec.padded_vocab(self.tp) // self.tp)
        return lambda logits, tokens: vocab_parallel_logprobs_and_entropy(
            logits, tokens, start, self.spec.vocab_size, self.tp_group, temperature)

    def _padded_out(self, out: torch.Tensor, mb: MicroBatch, to_padded: torch.Tensor | None) -> torch.Tensor:
        """The last stage's (b, s, k) model output as (b, T, k) in the padded layout: logits over
        the true vocabulary (this rank's vocabulary shard at TP > 1), or values (k=1)."""
        if to_padded is None:
            return out[..., : self._width()]
        b, T = mb["tokens"].shape
        out = out[0][:, : self._width()]  # (S, k)
        padded = out.new_zeros(b * T, out.shape[-1]).index_copy(0, to_padded, out)
        return padded.reshape(b, T, -1)

    def _width(self) -> int:
        if self.role == "critic":
            return 1
        return self.spec.padded_vocab(self.tp) // self.tp if self.vocab_parallel else self.spec.vocab_size

    def _forward(self, mb: MicroBatch, temperature: float) -> dict[str, torch.Tensor]:
        """Per-token outputs of one micro-batch (one stage: the whole model)."""
        kwargs, layout = self._model_inputs(mb)
        return self._last_stage_outputs(self.model(**kwargs), mb, layout, temperature)

    def _outputs(self, out: torch.Tensor, mb: MicroBatch, temperature: float) -> dict[str, torch.Tensor]:
        """The per-token outputs of ``rl.backend`` from (b, T, k) padded model outputs."""
        m = mb["attention_mask"]
        if self.role == "critic":
            return {"values": out.squeeze(-1).float() * m.float()}
        logprobs, entropy = self._logprobs_fn(temperature)(out, mb["tokens"])
        mf = m.to(logprobs.dtype)
        return {"logprobs": logprobs * mf, "entropy": entropy * mf}

    def _check_same_samples(self, samples: list[Sample]) -> None:
        """Raise if the pipeline stages or the CP ranks of this replica were handed different
        samples (each would plan its own micro-batches, and the pipeline's sends or the CP
        group's attention exchanges would not match)."""
        lengths = [int(s["tokens"].shape[0]) for s in samples]
        mine = torch.tensor([len(samples), sum(lengths), sum(int(s["tokens"].sum()) for s in samples)],
                            dtype=torch.int64, device=self.device)
        for size, group, who in ((self.pp, self.pp_group, "pipeline stages"), (self.cp, self.cp_group, "CP ranks")):
            if size == 1:
                continue
            low, high = mine.clone(), mine.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            if not torch.equal(low, high):
                raise ValueError(f"the {who} of one replica got different samples; give every rank of a replica "
                                 "the same shard (megatron_backend.replica_of(rank, world_size, tp, pp, cp))")

    def _forward_each(self, samples: list[Sample], key: str, temperature: float) -> list[torch.Tensor]:
        if self.pp > 1 or self.cp > 1:
            self._check_same_samples(samples)
        plan = self._plan(samples) if samples else []
        out: list[torch.Tensor | None] = [None] * len(samples)
        self.model.eval()
        with torch.no_grad():
            if self.pp > 1:
                mbs = [collate([samples[i] for i in idx], self.device) for idx in plan]
                per_mb = [r[key] for r in self._pipeline(mbs, temperature, None)]
            else:
                per_mb = (self._forward(collate([samples[i] for i in idx], self.device), temperature)[key].cpu()
                          for idx in plan)
            for idx, values in zip(plan, per_mb, strict=True):
                for j, i in enumerate(idx):
                    out[i] = values[j, : samples[i]["tokens"].shape[0]].clone()
        return out  # type: ignore[return-value]

    def _pipeline(self, mbs: list[MicroBatch], temperature: float, loss_fn: LossFn | None) -> list[dict[str, Any]]:
        """Run ``mbs`` through the pipeline with megatron-core's 1F1B schedule (forward only when
        ``loss_fn`` is None, else forward and backward, gradients accumulating in ``.grad``).

        Every stage collates the same micro-batches (all ranks of a replica hold its samples):
        the first embeds the tokens, the others take the previous stage's activations (p2p), and
        all build the attention mask. ``loss_fn`` runs on the last stage. Returns, on every
        stage (a broadcast from the last), one dict per micro-batch: the outputs (CPU tensors)
        when forward only, else ``{"loss": float, "metrics": {name: float}}``.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results: list[dict[str, Any]] = []
        if mbs:
            data = iter(mbs)

            def forward_step(data_iterator, model):
                mb = next(data_iterator)
                kwargs, layout = self._model_inputs(mb)
                out = model(**kwargs)  # (s, b, h) activations, or on the last stage (b, s, k)

                def on_last_stage(out: torch.Tensor):
                    outputs = self._last_stage_outputs(out, mb, layout, temperature)
                    one = torch.ones((), dtype=torch.int, device=out.device)
                    if loss_fn is None:
                        results.append({k: v.cpu() for k, v in outputs.items()})
                        return out.new_zeros(()), one, None
                    loss, metrics = loss_fn(outputs, mb)
                    results.append(_loss_record(loss, metrics))
                    return loss, one, None

                return out, on_last_stage

            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=self.model, num_microbatches=len(mbs),
                seq_length=max(int(mb["tokens"].shape[1]) for mb in mbs),
                micro_batch_size=max(int(mb["tokens"].shape[0]) for mb in mbs), forward_only=loss_fn is None)
        box = [results]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pp_group, self.pp - 1), group=self.pp_group)
        return box[0]

    # -- the protocol

    @property
    def reports(self) -> bool:
        """Whether this rank's outputs and metrics are its replica's: TP rank 0 and CP rank 0 of
        the first stage, the replica's lowest global rank (every rank of a replica returns the same)."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.pp_rank == 0

    def forward_logprobs(self, samples: list[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per sample, (t,) fp32 ``log p(tokens[i] | tokens[:i])`` at ``temperature`` (position 0: 0.0). No grad."""
        if self.role == "critic":
            raise ValueError("forward_logprobs: this backend is a critic; it has values, not log-probabilities")
        return self._forward_each(samples, "logprobs", temperature)

    def forward_values(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Per sample, (t,) fp32 critic values ``V(tokens[:i+1])``. No grad."""
        if self.role != "critic":
            raise ValueError(f"forward_values: this backend is a {self.role}; values come from the critic")
        return self._forward_each(samples, "values", 1.0)

    def train_step(self, samples: list[Sample], loss_fn: LossFn, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step over this rank's ``samples`` (its DP shard), as ``DeepSpeedBackend.train_step``."""
        if self.role == "reference":
            raise ValueError("train_step: the reference model is frozen")
        if self.pp > 1 or self.cp > 1:
            self._check_same_samples(samples)
        plan = self._plan(samples) if samples else []
        if distributed.all_reduce_max(len(plan)) == 0:
            raise ValueError("train_step: no samples on any rank")
        assert self.optimizer is not None and self.scheduler is not None
        sums: dict[str, float] = defaultdict(float)
        loss_sum = 0.0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        if self.pp > 1:
            records = self._pipeline([collate([samples[i] for i in idx], self.device) for idx in plan],
                                     temperature, loss_fn)
        else:
            records = []
            for idx in plan:
                mb = collate([samples[i] for i in idx], self.device)
                loss, metrics = loss_fn(self._forward(mb, temperature), mb)
                loss.backward()
                records.append(_loss_record(loss, metrics))
        for r in records:
            loss_sum += r["loss"]
            for name, value in r["metrics"].items():
                sums[name] += value
        self._reduce_grads()
        grad_norm = self._grad_norm()
        clip = self.optim_cfg.grad_clip
        if clip is not None and grad_norm > clip:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(clip / (grad_norm + 1e-6))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.model.eval()
        self.global_step += 1
        out = dict(sums)
        out.setdefault("loss", loss_sum)
        out.update(num_micro_batches=float(len(plan)), grad_norm=grad_norm, lr=lr)
        return out

    def _reduce_grads(self) -> None:
        """Sum gradients over the DP replicas and their CP ranks, and a tied embedding's over its
        two stages. Afterwards every CP rank of a replica holds the same, whole gradient."""
        if self.embedding_group is not None:
            w = self.model.shared_embedding_or_output_weight()
            if w is not None and w.grad is not None:
                dist.all_reduce(w.grad, op=dist.ReduceOp.SUM, group=self.embedding_group)
        if dist.get_world_size(self.dp_group) == 1:
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.dp_group)

    def _grad_norm(self) -> float:
        """The whole model's gradient norm: TP-sharded slices summed over the TP group,
        replicated weights once, each stage's parameters once over the PP group (a tied
        embedding's last-stage copy, megatron's ``shared`` weight, not at all). Not summed over
        the CP group: after ``_reduce_grads`` its ranks hold the same gradient, counted once."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            if p.grad is None or getattr(p, "shared", False):
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.tp > 1:
            dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=self.tp_group)
        total = sharded + replicated
        if self.pp > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.pp_group)
        return float(total.sqrt())

    def _megatron_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                 if not k.endswith("_extra_state")}
        if self.te:
            state = from_te_names(state)
        if self.role == "critic":
            state = {k.replace("output_layer.", f"{VALUE_HEAD}."): v for k, v in state.items()}
        return state

    def state_dict_for_engine(self, on_this_rank: bool = True) -> dict[str, torch.Tensor]:
        """Full weights under HF names, CPU tensors, on global rank 0 (``{}`` elsewhere).

        The ranks of DP replica 0 and CP rank 0 take part (TP shards are gathered to each stage's
        TP rank 0, the stages to the first stage's); the other replicas and CP ranks, holding the
        same weights, return at once. Tied models share one tensor for embed/lm_head.
        """
        if self.dp_rank != 0 or self.cp_rank != 0:
            return {}
        local = self._megatron_state()
        if self.tp == 1:
            shards = [local]
        else:
            shards = [None] * self.tp if self.tp_rank == 0 else None
            dst = dist.get_global_rank(self.tp_group, 0)
            dist.gather_object(local, shards, dst=dst, group=self.tp_group)
        if self.tp_rank != 0:
            return {}
        stages = [shards]
        if self.pp > 1:  # TP rank 0 of each stage sends its stage's TP shards to the first stage's
            stages = [None] * self.pp if self.pp_rank == 0 else None
            dist.gather_object(shards, stages, dst=dist.get_global_rank(self.pp_group, 0), group=self.pp_group)
        if self.pp_rank != 0 or not on_this_rank:
            return {}
        hf = megatron_to_hf(stages, self.spec, role=self.role)  # type: ignore[arg-type]
        return {k: hf[k] for k in sorted(hf)}

    def export_hf(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """Write an HF checkpoint directory (config, safetensors, tokenizer); all ranks call it,
        global rank 0 writes into a temporary sibling and renames it to ``path`` (``durable``:
        fsynced; not durable: a hand-off, rewritten in place when it can be, as
        ``DeepSpeedBackend.export_hf``)."""
        from safetensors.torch import save_file

        path = Path(path)
        state = self.state_dict_for_engine()
        if self.spec.tie_word_embeddings and self.role != "critic":
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        in_place = self.rank == 0 and not durable and overwrite_safetensors(path, state)
        if self.rank == 0 and not in_place:
            tmp = path.with_name(f".{path.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            self._hf_out_config().save_pretrained(tmp)
            copy_tokenizer_files(self.model_path, tmp)
            if durable:
                _fsync_tree(tmp)
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _hf_out_config(self):
        import copy

        cfg = copy.deepcopy(self.hf_config)
        if self.role == "critic":
            arch = type(cfg).__name__.replace("Config", "ForTokenClassification")
            cfg.architectures = [arch]
            cfg.num_labels = 1
            cfg.id2label, cfg.label2id = {0: "value"}, {"value": 0}
        cfg.dtype = str(self.dtype).removeprefix("torch.")
        return cfg

    def save(self, path: str | os.PathLike[str]) -> None:
        """Weights (per-rank Megatron shards, a stage's on each of its ranks, and an ``hf/`` export
        of the whole model), optimizer, scheduler, RNG and
        step counter under ``path``, written into ``.<name>.partial`` and renamed when complete
        (as ``DeepSpeedBackend.save``). All ranks call it."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"save: {path} already exists and is not an empty directory; save into a fresh path")
        tmp = path.with_name(f".{path.name}.partial")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        blob: dict[str, Any] = {"model": self._megatron_state(), "rng": _rng_state()}
        if self.optimizer is not None:
            blob["optimizer"] = self.optimizer.state_dict()
            blob["scheduler"] = self.scheduler.state_dict()
        torch.save(blob, tmp / f"rank{self.rank}.pt")
        self.export_hf(tmp / "hf")
        distributed.barrier()
        if self.rank == 0:
            meta = {"format": CHECKPOINT_FORMAT, "backend": "megatron", "role": self.role,
                    "global_step": self.global_step, "world_size": self.world_size,
                    "tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp,
                    "context_parallel_size": self.cp, "dtype": str(self.dtype).removeprefix("torch.")}
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        distributed.barrier()

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore everything ``save`` wrote (same role, world size, TP, PP and CP sizes: each
        rank reads its own shard, ``rank{r}.pt``)."""
        path = Path(path)
        meta_file = path / _META
        if not meta_file.is_file():
            raise FileNotFoundError(f"load: {path} is not a complete backend checkpoint (no {_META})")
        meta = json.loads(meta_file.read_text())
        for key, mine in (("backend", "megatron"), ("role", self.role), ("world_size", self.world_size),
                          ("tensor_parallel_size", self.tp), ("pipeline_parallel_size", self.pp),
                          ("context_parallel_size", self.cp)):
            # Checkpoints from before pipeline and context parallel have neither key: size 1.
            if meta.get(key, 1 if key in ("pipeline_parallel_size", "context_parallel_size") else None) != mine:
                raise ValueError(f"load: {path} was saved with {key}={meta.get(key)!r}, this backend has {key}={mine!r}")
        blob = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        state = blob["model"]
        if self.role == "critic":
            state = {k.replace(f"{VALUE_HEAD}.", "output_layer."): v for k, v in state.items()}
        if self.te:
            state = to_te_names(state)
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"])
        self.global_step = int(meta["global_step"])
        self.model.eval()

    def close(self) -> None:
        del self.model, self.optimizer
