"""The DeepSpeed ``TrainerBackend``: one data-parallel rank of a policy, critic or reference model.

It implements ``rl.backend.TrainerBackend`` (read its conventions first) on a DeepSpeed engine:
ZeRO stage 0-3 from ``TrainerConfig.zero_stage``, gloo on CPU and NCCL on GPUs, a plain
``torch.optim.AdamW`` as the client optimizer (no compiled DeepSpeed ops), a linear learning-rate
warm-up, and gradient-norm clipping done by DeepSpeed.

Gradient accumulation over a variable number of micro-batches
--------------------------------------------------------------
The number of micro-batches in one optimizer step changes from step to step (sub-traces have any
length). DeepSpeed is configured with ``gradient_accumulation_steps=1`` and the accumulation
boundary is set by hand before each backward (``set_gradient_accumulation_boundary``: False, ...,
False, True), then ``step()`` is called once. Backward is called with ``scale_wrt_gas=False``, so
DeepSpeed does not divide by an accumulation count, and on a loss multiplied by the data-parallel
world size, which undoes DeepSpeed's gradient averaging over ranks. The gradient of one step is
therefore the plain sum over micro-batches and ranks of the ``loss_fn`` outputs, as
``rl.backend`` requires; ``loss_fn`` normalises by the whole minibatch.

Data parallelism (world_size > 1)
---------------------------------
Each rank is given its own shard of the minibatch by the caller (``rl.trainer_actor.TrainerGroup``
shards by tokens). A rank may hold fewer micro-batches than another, or none: ranks agree on the
largest count (one all-reduce) and a rank that runs out does forward/backward passes on a dummy
2-token sequence with a zero loss, because ZeRO's collectives (gradient reduce-scatter, ZeRO-3
parameter all-gathers) need every rank to take part in every pass. ``train_step`` returns this
rank's sums; the caller adds the ranks' sums (``grad_norm`` and ``lr`` are already global).

Memory
------
Log-probabilities and entropies are computed in fp32 from the model's logits in chunks of rows
under activation checkpointing, so at most one chunk of fp32 ``(rows, vocab)`` temporaries is
alive at a time, in forward and in backward (a micro-batch of one chunk is not checkpointed:
its temporaries are no larger than its logits). Logits are computed from the first position
an action token needs on (HF ``logits_to_keep``): a prompt costs no LM head.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from relayrl.config import OptimConfig, TrainerConfig
from relayrl.critic.value_model import compute_values, disable_dropout, load_value_model
from relayrl.rl import distributed
from relayrl.rl.backend import LossFn, MicroBatch, Role, Sample
from relayrl.rl.checkpoint import overwrite_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_FORMAT = 1
_META = "relayrl_backend.json"  # written last: its presence marks a complete checkpoint
_DS_TAG = "deepspeed"
_CHUNK_BYTES = 256 * 2**20  # fp32 bytes of one (rows, vocab) temporary in the log-prob kernel


# ----------------------------------------------------------------------------- pure helpers


def plan_micro_batches(
    lengths: list[int], micro_batch_size: int, max_tokens_per_micro_batch: int | None = None
) -> list[list[int]]:
    """Group sample indices into micro-batches.

    Samples are taken longest first (a stable sort, so the plan is deterministic) to keep
    right-padding small. By count: ``micro_batch_size`` samples per micro-batch. By tokens:
    a micro-batch grows while its padded size ``len(mb) * longest`` stays within
    ``max_tokens_per_micro_batch``; a sample longer than that gets a micro-batch of its own.

    Returns:
        micro-batches as lists of indices into ``lengths``; every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_tokens_per_micro_batch is None:
        return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    plan: list[list[int]] = []
    for i in order:
        # Longest first: the first sample of a micro-batch is its longest.
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens_per_micro_batch:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


MIN_SHARED_TOKENS = 16
"""A shared-prompt micro-batch must spare at least this many tokens' worth of compute."""


def prompt_length(sample: Sample) -> int:
    """Tokens before the sample's first action (``loss_mask`` 1); 0 without a loss mask or action."""
    mask = sample.get("loss_mask")
    if mask is None:
        return 0
    actions = mask.bool().nonzero()
    return int(actions[0]) if len(actions) else 0


def plan_shared_prompts(
    samples: list[Sample], micro_batch_size: int, max_tokens_per_micro_batch: int | None = None,
    attention_cost: float = 0.0, min_shared_tokens: int = MIN_SHARED_TOKENS,
) -> list[tuple[list[int], int]]:
    """Micro-batches in which samples that start with the same prompt run it once.

    Samples whose tokens before their first action are identical (a GRPO or PPO group of one
    task: ``group_size`` completions of one prompt) form a group. A group is cut into
    micro-batches of at most ``micro_batch_size`` samples, longest first (by tokens: the
    prompt plus the suffixes within ``max_tokens_per_micro_batch``). One of two or more samples
    becomes a shared micro-batch (``SharedRow``: one row of prompt + suffixes) when what it
    spares, ``(count - 1) * prompt`` tokens, less its extra attention, ``attention_cost *
    (row^2 - sum of (prompt + suffix)^2)`` (a dense mask computes every query-key pair of the
    row), is at least ``min_shared_tokens``. ``attention_cost`` is the cost of one query-key
    pair in units of one token through the layers. Every other sample is planned by
    ``plan_micro_batches``.

    Returns:
        ``(indices, prompt_len)`` per micro-batch: ``prompt_len`` > 0 for a shared one (its
        samples agree on their first ``prompt_len`` tokens), 0 for an ordinary one. Every index
        appears once; the order is deterministic.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        n = prompt_length(s)
        if n > 0:
            groups.setdefault(tuple(s["tokens"][:n].tolist()), []).append(i)
    lengths = [int(s["tokens"].shape[0]) for s in samples]
    plan: list[tuple[list[int], int]] = []
    taken: set[int] = set()
    for prompt, members in groups.items():
        n = len(prompt)
        if len(members) < 2:
            continue
        chunks: list[list[int]] = []
        for i in sorted(members, key=lambda i: -lengths[i]):
            last = chunks[-1] if chunks else None
            if last is not None and len(last) < micro_batch_size and (
                max_tokens_per_micro_batch is None
                or n + sum(lengths[j] - n for j in last) + lengths[i] - n <= max_tokens_per_micro_batch
            ):
                last.append(i)
            else:
                chunks.append([i])
        for chunk in chunks:
            row = n + sum(lengths[j] - n for j in chunk)
            extra_pairs = row * row - sum(lengths[j] ** 2 for j in chunk)
            if len(chunk) >= 2 and (len(chunk) - 1) * n - attention_cost * extra_pairs >= min_shared_tokens:
                plan.append((chunk, n))
                taken.update(chunk)
    rest = [i for i in range(len(samples)) if i not in taken]
    for mb in plan_micro_batches([lengths[i] for i in rest], micro_batch_size, max_tokens_per_micro_batch):
        plan.append(([rest[j] for j in mb], 0))
    return plan


class SharedRow:
    """A micro-batch of samples that share their first ``n`` tokens, laid out as one row.

    The row is the prompt once, then every sample's suffix: ``[prompt, suffix_0, suffix_1,
    ...]``. Each suffix sits at positions ``n..`` (RoPE sees it where it is in its own
    sequence) and attends, through a block mask, to the prompt and to its own earlier tokens
    only, so every token computes what it computes in its own sequence, and one forward pass
    (every GEMM over ``n + sum(suffix)`` rows) replaces ``b`` copies of the prompt.

    Args:
        tokens, attention_mask: the micro-batch as ``collate`` pads it, (b, T).
        n: the shared prompt length.

    Attributes:
        ids, position_ids: (1, L) the row and its positions.
        mask: (1, 1, L, L) bool, True where a query (row) may attend a key (column).
        index: (b, T) int64, the row position of each sample's token t (0 at padding).
    """

    def __init__(self, tokens: torch.Tensor, attention_mask: torch.Tensor, n: int) -> None:
        lengths = attention_mask.sum(-1).tolist()
        dev = tokens.device
        parts, segs, pos = [tokens[0, :n]], [torch.zeros(n, dtype=torch.int64, device=dev)], [torch.arange(n, device=dev)]
        b, T = tokens.shape
        index = torch.zeros(b, T, dtype=torch.int64, device=dev)
        index[:, :n] = torch.arange(n, device=dev)
        offset = n
        for i, length in enumerate(lengths):
            m = length - n
            parts.append(tokens[i, n:length])
            segs.append(torch.full((m,), i + 1, dtype=torch.int64, device=dev))
            pos.append(torch.arange(n, length, device=dev))
            index[i, n:length] = torch.arange(offset, offset + m, device=dev)
            offset += m
        seg = torch.cat(segs)
        q = torch.arange(offset, device=dev)
        causal = q[None, :] <= q[:, None]
        self.ids = torch.cat(parts)[None]
        self.position_ids = torch.cat(pos)[None]
        self.mask = (causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None])))[None, None]
        self.index = index


def collate(samples: list[Sample], device: torch.device | str = "cpu") -> MicroBatch:
    """Right-pad per-token fields to the longest sample; add ``attention_mask``.

    Args:
        samples: dicts of 1-D tensors, all of one sample's length t (``tokens`` is required).

    Returns:
        fields (b, T) with zeros in padded positions (dtypes kept), plus ``attention_mask``
        (b, T) int64, 1 on real tokens.
    """
    keys = list(samples[0])
    if "tokens" not in keys:
        raise ValueError("a sample needs a 'tokens' field (t,) of token ids")
    lengths = [int(s["tokens"].shape[0]) for s in samples]
    T = max(lengths)
    out: MicroBatch = {}
    for k in keys:
        ref = samples[0][k]
        buf = torch.zeros((len(samples), T), dtype=ref.dtype)
        for j, s in enumerate(samples):
            if set(s) != set(keys):
                raise ValueError(f"samples of one batch must have the same fields; got {sorted(keys)} and {sorted(s)}")
            v = s[k]
            if v.dim() != 1 or v.shape[0] != lengths[j]:
                raise ValueError(
                    f"sample field {k!r} has shape {tuple(v.shape)}, but every field must be 1-D "
                    f"with one value per token (t={lengths[j]})"
                )
            buf[j, : lengths[j]] = v
        out[k] = buf
    mask = torch.zeros((len(samples), T), dtype=torch.int64)
    for j, n in enumerate(lengths):
        mask[j, :n] = 1
    out["attention_mask"] = mask
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def _chunk_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    lse = torch.logsumexp(x, dim=-1)
    logprobs = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(x - lse.unsqueeze(-1))
    entropy = lse - (p * x).sum(-1)
    return logprobs, entropy


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and entropy of the distribution each token was sampled from, in fp32.

    Args:
        logits: (b, t, v) next-token logits, ``logits[:, i]`` predicts ``tokens[:, i+1]``.
        tokens: (b, t) token ids.
        temperature: the sampling temperature; the distribution is ``softmax(logits / temperature)``.

    Returns:
        logprobs: (b, t), ``logprobs[:, i] = log p(tokens[i] | tokens[:i])``; position 0 is 0.0.
        entropy: (b, t), ``entropy[:, i] = H(p(. | tokens[:i]))``; position 0 is 0.0.

    ``log p = x_tok - logsumexp(x)`` and ``H = logsumexp(x) - sum softmax(x) * x`` with
    ``x = logits / temperature``, row by row in chunks (checkpointed when grad is needed and there is more than one).
    """
    b, t, v = logits.shape
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]  # the last position predicts nothing; its value is dropped below
    flat, flat_targets = logits.reshape(b * t, v), targets.reshape(b * t)
    rows = max(1, _CHUNK_BYTES // (4 * v))
    # One chunk holds no more than the logits themselves: recomputing it in backward saves nothing.
    ckpt = torch.is_grad_enabled() and logits.requires_grad and b * t > rows
    lp_parts, ent_parts = [], []
    for s in range(0, b * t, rows):
        args = (flat[s : s + rows], flat_targets[s : s + rows], temperature)
        lp, ent = checkpoint(_chunk_logprobs_entropy, *args, use_reentrant=False) if ckpt else _chunk_logprobs_entropy(*args)
        lp_parts.append(lp)
        ent_parts.append(ent)
    lp = torch.cat(lp_parts).reshape(b, t)
    ent = torch.cat(ent_parts).reshape(b, t)
    zero = lp.new_zeros(b, 1)
    return torch.cat([zero, lp[:, :-1]], dim=1), torch.cat([zero, ent[:, :-1]], dim=1)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        flat = grad.reshape(rows.numel(), *grad.shape[rows.dim():])
        out = grad.new_zeros(ctx.num_rows, *flat.shape[1:])
        return out.index_add_(0, rows.reshape(-1), flat), None


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for ``x (R, ...)`` and int64 ``rows`` of any shape, with a faster backward.

    The gradient of a row is the sum of the gradients of its copies, added in the order of
    ``rows.reshape(-1)`` (``index_add_``). Indexing's own backward (``index_put_`` with
    ``accumulate=True``) gives the same sums, but on a CPU with several threads it adds the
    copies of a repeated row in another order (one rounding apart) and takes about 4x as long:
    ~65 against ~16 ms for a shared-prompt micro-batch of SmolLM2's (4, 64, 49152) logits, one
    pass per micro-batch.
    """
    return _GatherRows.apply(x, rows)


def _policy_outputs(logits: torch.Tensor, tokens: torch.Tensor, start: int, mask: torch.Tensor,
                    temperature: float) -> dict[str, torch.Tensor]:
    """The policy's (b, T) ``logprobs`` and ``entropy`` from logits (b, T - start, V) at positions
    ``start..``: positions before ``start`` are no action's and hold 0.0 (rl.backend
    conventions), as does padding."""
    logprobs, entropy = token_logprobs_and_entropy(logits, tokens[:, start:], temperature)
    if start:
        pad = logprobs.new_zeros(tokens.shape[0], start)
        logprobs, entropy = torch.cat([pad, logprobs], dim=1), torch.cat([pad, entropy], dim=1)
    m = mask.to(logprobs.dtype)
    return {"logprobs": logprobs * m, "entropy": entropy * m}


def _attention_cost(config: Any) -> float | None:
    """FLOPs of one query-key pair (scores and weighted values) over those of one token through
    the layers' projections and MLP, from an HF decoder config; None if it lacks the numbers."""
    try:
        e, inter = int(config.hidden_size), int(config.intermediate_size)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        d = int(getattr(config, "head_dim", None) or e // heads)
    except (AttributeError, TypeError):
        return None
    per_token = 2 * (e * (heads + 2 * kv) * d + heads * d * e + 3 * e * inter)
    return 4 * heads * d / per_token


def _tied_input_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding if it shares its weight with the LM head, else None."""
    emb, head = model.get_input_embeddings(), getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(emb, torch.nn.Embedding) and head is not None and head.weight is emb.weight:
        return emb
    return None


def own_parameter_memory(model: torch.nn.Module) -> None:
    """Give every parameter memory of its own, copied from what it was loaded into.

    ``from_pretrained`` leaves weights of the checkpoint's dtype as views of the safetensors
    file's private memory map. For weights that are trained in place that has two costs: a
    page of the file not yet written shows any later change to the file (a checkpoint
    overwritten in place would leak into the model), and the first optimizer step copies every
    page on write, one fault per 4 KiB (SmolLM2: 131k faults, 1.7 s of the first train step in
    a loaded job on this CPU). The copy is made here instead, once, before any rollout; tied
    weights stay tied (each ``Parameter`` is visited once and keeps its identity).
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()


def materialize_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter of a fresh ``torch.optim.Adam``/``AdamW`` the state its
    first ``step`` would create (step 0, zero moments), now, through ``load_state_dict``.

    The same numbers as the lazy creation, so the same updates; what changes is when the
    memory (two copies of the weights) is allocated and first touched: at set-up instead of
    inside the first training step, after the first rollouts (on this CPU VM the page faults of
    those ~1 GB cost ~4 s of SmolLM2's first step), and an out-of-memory shows before any
    rollout is spent. DeepSpeed's ZeRO optimizers create their state at set-up too. An
    optimizer that already has state is left alone.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"materialize_adam_state: {type(optimizer).__name__} is not Adam or AdamW")
    current = optimizer.state_dict()
    if current["state"]:
        return
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
                state[index] = {"step": torch.tensor(0.0), **{name: torch.zeros_like(p) for name in names}}
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _warmup_factor(warmup_steps: int):
    def factor(step: int) -> float:
        # Optimizer step k (0-based) runs at lr * min(1, (k+1)/warmup_steps).
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: str | os.PathLike[str], dst: Path) -> None:
    """Copy the tokenizer (and generation config) files of HF directory ``src`` that exist into
    ``dst``: an export loads with the same tokenizer, without loading and re-saving it."""
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


# ----------------------------------------------------------------------------- the backend


class DeepSpeedBackend:
    """One data-parallel rank of a DeepSpeed-trained policy, critic, or frozen reference.

    Args:
        role: ``policy`` (causal LM; logprobs, trains), ``critic`` (value model from
            ``critic.value_model``; values, trains) or ``reference`` (causal LM; logprobs only,
            no optimizer).
        model_path: an HF checkpoint directory (the critic accepts a causal LM, whose backbone
            it takes, or a saved critic).
        trainer_cfg: micro-batching, ZeRO stage, gradient checkpointing.
        optim_cfg: the role's optimizer (``trainer_cfg.policy`` or ``trainer_cfg.critic`` if
            None; unused by the reference).
        dtype: parameter dtype, ``float32``/``bfloat16``/``float16`` or a torch dtype; half
            dtypes train with DeepSpeed's fp32 master weights.
        rank, world_size: this process's data-parallel rank (the process group is created on
            first use, see ``rl.distributed``).
        seed: seeds torch's RNG before the model is built (the critic's fresh value head).
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
        import deepspeed

        if role not in ("policy", "critic", "reference"):
            raise ValueError(f"role: {role!r} is not one of policy, critic, reference")
        self.role: Role = role
        self.model_path = str(model_path)
        self.trainer_cfg = trainer_cfg
        if optim_cfg is None:
            optim_cfg = trainer_cfg.critic if role == "critic" else trainer_cfg.policy
        self.optim_cfg = optim_cfg
        self.dtype = _as_dtype(dtype)
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        # ZeRO 1-2 partition optimizer state, which a frozen reference has none of: it is replicated.
        stage = trainer_cfg.zero_stage
        if stage == "auto":
            stage = 0 if world_size == 1 and self.dtype == torch.float32 else 2
        self.zero_stage = 3 if stage == 3 else (0 if role == "reference" else int(stage))
        if self.zero_stage == 0 and self.dtype != torch.float32 and role != "reference":
            raise ValueError(
                f"trainer.zero_stage=0 with model.dtype={str(self.dtype).removeprefix('torch.')}: DeepSpeed's "
                "non-ZeRO half-precision optimizer unscales gradients by a loss scale that is never "
                "applied, which shrinks every update. Use zero_stage 1 or more (on one rank it costs "
                "the same memory as stage 0) or dtype float32."
            )
        self.global_step = 0
        """Optimizer steps taken (restored by ``load``)."""

        distributed.init_distributed(rank, world_size)
        self.device = distributed.device()
        ds_config = self._ds_config()

        torch.manual_seed(seed)
        self.module = self._build_model(ds_config)

        optimizer = scheduler = None
        if role != "reference":
            optimizer = self._build_optimizer()
            if self.zero_stage == 0:  # ZeRO 1-3 wrap it and create their own state at set-up
                materialize_adam_state(optimizer)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(optim_cfg.warmup_steps))
        self.engine, *_ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        if self.zero_stage == 0 and world_size == 1:
            # Nothing to reduce over one rank; DeepSpeed would still flatten, "reduce" and copy back
            # every gradient at each boundary (about a tenth of a small model's step on a CPU).
            self.engine.enable_backward_allreduce = False
        self.engine.eval()
        # HF causal LMs that take ``logits_to_keep`` compute the LM head on the last positions only.
        self._keeps_logits = role != "critic" and "logits_to_keep" in inspect.signature(self.module.forward).parameters
        # Shared prompts need an attention that takes a custom 4-D mask (HF's sdpa and eager do;
        # flash-attention kernels do not) and the model's numbers for the cost of attention.
        self._attention_cost = _attention_cost(self.module.config)
        self._shares_prompts = bool(
            trainer_cfg.share_prompts and self._attention_cost is not None
            and getattr(self.module.config, "_attn_implementation", None) in ("sdpa", "eager")
        )

    # -- construction

    def _ds_config(self) -> dict[str, Any]:
        cfg, optim = self.trainer_cfg, self.optim_cfg
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            # Full weights are gathered by state_dict_for_engine/export_hf, not by DeepSpeed's save.
            zero["stage3_gather_16bit_weights_on_model_save"] = False
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # accumulation boundaries are set by hand, see the module doc
            "train_batch_size": cfg.micro_batch_size * self.world_size,
            # Without ZeRO the backend clips (one norm computation instead of two, see train_step).
            "gradient_clipping": float(optim.grad_clip or 0.0) if self.role != "reference" and self.zero_stage else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16, "loss_scale": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    def _build_model(self, ds_config: dict[str, Any]) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # ZeRO-3: while an HfDeepSpeedConfig is alive, from_pretrained builds the model already
        # partitioned (deepspeed.zero.Init), so no rank ever holds the full model. It is a
        # process-wide switch, so it is turned off again at once for the other backends.
        hf_ds = HfDeepSpeedConfig(ds_config) if self.zero_stage == 3 else None
        try:
            if self.role == "critic":
                model = load_value_model(self.model_path, dtype=self.dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
                disable_dropout(model)
        finally:
            if hf_ds is not None:
                unset_hf_deepspeed_config()
                del hf_ds
        if self.role == "reference":
            model.requires_grad_(False)
        else:
            if self.zero_stage != 3 and torch.device(self.device).type == "cpu":
                own_parameter_memory(model)
            if self.zero_stage == 0 and (tied := _tied_input_embedding(model)) is not None:
                # The tied weight's gradient is dense anyway (the LM head's); the lookup's part,
                # as a sparse gradient of the looked-up rows, is added into it, instead of a
                # zero-filled dense copy of the whole vocabulary summed in (three passes over the
                # embedding per micro-batch, ~5% of a SmolLM2 step on this CPU). The same numbers:
                # only the addition is cheaper. Without ZeRO only: its hooks would see the sparse part.
                tied.sparse = True
        if self.role != "reference" and self.trainer_cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.optim_cfg
        decay, no_decay = [], []
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            # Norm gains and biases are not decayed (the usual AdamW practice). Under ZeRO-3
            # ``p.shape`` is a partition's; ``ds_shape`` is the real one.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=False)

    # -- micro-batches

    def _plan(self, samples: list[Sample]) -> list[tuple[list[int], int]]:
        """Micro-batches as ``(indices, prompt_len)``; ``prompt_len`` > 0: a shared prompt."""
        lengths = [int(s["tokens"].shape[0]) for s in samples]
        if any(n < 1 for n in lengths):
            raise ValueError("a sample has an empty 'tokens' tensor; every sample needs at least one token")
        cfg = self.trainer_cfg
        if self._shares_prompts:
            return plan_shared_prompts(samples, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                                       attention_cost=self._attention_cost)
        return [(mb, 0) for mb in plan_micro_batches(lengths, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch)]

    def _dummy_micro_batch(self) -> MicroBatch:
        tokens = torch.zeros((1, 2), dtype=torch.int64, device=self.device)
        return {"tokens": tokens, "attention_mask": torch.ones_like(tokens)}

    def _forward(self, mb: MicroBatch, temperature: float, prompt_len: int = 0) -> dict[str, torch.Tensor]:
        if prompt_len:
            return self._forward_shared(mb, temperature, prompt_len)
        mask = mb["attention_mask"]
        if self.role == "critic":
            return {"values": compute_values(self.engine, mb["tokens"], mask)}
        tokens = mb["tokens"]
        start = self._first_scored_position(mb)
        kwargs = {"logits_to_keep": tokens.shape[1] - start} if start else {}
        logits = self.engine(input_ids=tokens, attention_mask=mask, use_cache=False, **kwargs).logits
        return _policy_outputs(logits, tokens, start, mask, temperature)

    def _forward_shared(self, mb: MicroBatch, temperature: float, n: int) -> dict[str, torch.Tensor]:
        """``_forward`` of samples that agree on their first ``n`` tokens, as one ``SharedRow``:
        the same outputs, computed on ``n + sum(suffix)`` tokens instead of ``b * n + sum(suffix)``."""
        tokens, mask = mb["tokens"], mb["attention_mask"]
        row = SharedRow(tokens, mask, n)
        if self.role == "critic":
            out = self.engine(input_ids=row.ids, position_ids=row.position_ids, attention_mask=row.mask, use_cache=False)
            return {"values": out.logits[0, :, 0].float()[row.index] * mask.to(torch.float32)}
        # Logits from the prompt's last position (which predicts every first action) on.
        first = n - 1
        keep = {"logits_to_keep": row.ids.shape[1] - first} if self._keeps_logits else {}
        logits = self.engine(input_ids=row.ids, position_ids=row.position_ids, attention_mask=row.mask,
                             use_cache=False, **keep).logits[0]
        offset = first if keep else 0
        # Each sample's logits at its positions first.. (padding reads row 0; masked below).
        rows = (row.index[:, first:] - offset).clamp(min=0)
        return _policy_outputs(gather_rows(logits, rows), tokens, first, mask, temperature)

    def _first_scored_position(self, mb: MicroBatch) -> int:
        """The first position whose logits the micro-batch's action tokens need, or 0 for all.

        Logits at position j give the logprob of token j + 1, so action tokens from position a
        on need logits from a - 1 on. The LM head and the fp32 log-softmax over the vocabulary
        are the largest per-token cost after the layers; a prompt's positions skip them (HF's
        ``logits_to_keep``). Samples without a ``loss_mask`` are scored everywhere.
        """
        if "loss_mask" not in mb or not self._keeps_logits:
            return 0
        actions = mb["loss_mask"].bool().any(dim=0).nonzero()
        return max(int(actions[0]) - 1, 0) if len(actions) else 0

    def _forward_each(self, samples: list[Sample], key: str, temperature: float) -> list[torch.Tensor]:
        plan = self._plan(samples) if samples else []
        # ZeRO-3 gathers parameters collectively in every forward: ranks must run as many.
        n = distributed.all_reduce_max(len(plan)) if self.zero_stage == 3 else len(plan)
        out: list[torch.Tensor | None] = [None] * len(samples)
        self.engine.eval()
        with torch.no_grad():
            for k in range(n):
                if k >= len(plan):
                    self._forward(self._dummy_micro_batch(), temperature)
                    continue
                idx, prompt_len = plan[k]
                mb = collate([samples[i] for i in idx], self.device)
                values = self._forward(mb, temperature, prompt_len)[key].cpu()
                for j, i in enumerate(idx):
                    out[i] = values[j, : samples[i]["tokens"].shape[0]].clone()
        return out  # type: ignore[return-value]

    # -- the protocol

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
        """One optimizer step over this rank's ``samples``, accumulating micro-batches.

        ``loss_fn(outputs, micro_batch) -> (loss, metrics)`` is called once per micro-batch;
        ``outputs`` holds ``logprobs`` and ``entropy`` (policy) or ``values`` (critic), each
        (b, T) fp32 with grad and 0.0 at padded positions. Gradients are the sum of the
        losses' gradients over micro-batches and ranks.

        Returns:
            this rank's sums of ``metrics`` over micro-batches, ``loss`` (the sum of the
            losses, unless ``metrics`` has its own), ``num_micro_batches``, and the global
            ``grad_norm`` (before clipping) and ``lr`` of this step.
        """
        if self.role == "reference":
            raise ValueError("train_step: the reference model is frozen")
        plan = self._plan(samples) if samples else []
        n = distributed.all_reduce_max(len(plan))
        if n == 0:
            raise ValueError("train_step: no samples on any rank")
        sums: dict[str, float] = defaultdict(float)
        loss_sum = 0.0
        self.engine.train()
        for k in range(n):
            self.engine.set_gradient_accumulation_boundary(k == n - 1)
            if k < len(plan):
                idx, prompt_len = plan[k]
                mb = collate([samples[i] for i in idx], self.device)
                loss, metrics = loss_fn(self._forward(mb, temperature, prompt_len), mb)
                loss_sum += float(loss.detach())
                for name, value in metrics.items():
                    sums[name] += float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            else:
                # Out of micro-batches: a zero-loss pass keeps this rank in ZeRO's collectives.
                loss = sum(v.sum() for v in self._forward(self._dummy_micro_batch(), temperature).values()) * 0.0
            # DeepSpeed averages gradients over ranks; the loss is normalised for the global batch,
            # so scale by world size to get the sum (scale_wrt_gas=False: no 1/accumulation-steps).
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        lr = float(self.engine.get_lr()[0])
        grad_norm = self._clip_stage0() if self.zero_stage == 0 else None
        self.engine.step()
        if grad_norm is None:
            grad_norm = float(self.engine.get_global_grad_norm())
        self.engine.eval()
        self.global_step += 1
        out = dict(sums)
        out.setdefault("loss", loss_sum)
        out.update(num_micro_batches=float(len(plan)), grad_norm=grad_norm, lr=lr)
        return out

    def _clip_stage0(self) -> float:
        """Without ZeRO, DeepSpeed's optimizer keeps no norm: the global norm (the gradients are
        already all-reduced here) is computed once and used to clip, as ``grad_clip`` asks."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.optim_cfg.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.engine.module.parameters(), self.optim_cfg.grad_clip, norm, foreach=True)
        return float(norm)

    def state_dict_for_engine(self, on_this_rank: bool = True, copy: bool = True) -> dict[str, torch.Tensor]:
        """Full weights under HF names (the module's ``state_dict`` keys), contiguous CPU tensors.

        Under ZeRO-3 every rank must call this (parameters are gathered module by module);
        ranks with ``on_this_rank=False`` take part in the gathers and return ``{}``.
        Tied weights (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) share one tensor.
        ``copy=False``: a parameter that is already a whole contiguous CPU tensor is returned
        itself (detached), for a caller that uses the weights before the next optimizer step.
        """
        import deepspeed

        if not on_this_rank and self.zero_stage != 3:
            return {}
        module = self.engine.module
        keys = set(module.state_dict().keys())
        copies: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            params = list(mod.named_parameters(recurse=False))
            if params and self.zero_stage == 3:
                ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
            else:
                ctx = nullcontext()
            with ctx:
                if not on_this_rank:
                    continue
                for name, t in params + list(mod.named_buffers(recurse=False)):
                    key = prefix + name
                    if key not in keys:
                        continue
                    if id(t) not in copies:
                        shared = not copy and self.zero_stage != 3 and t.device.type == "cpu" and t.is_contiguous()
                        copies[id(t)] = t.detach() if shared else t.detach().to("cpu", copy=True).contiguous()
                    out[key] = copies[id(t)]
        if on_this_rank:
            missing = keys - set(out)
            if missing:
                raise RuntimeError(f"state_dict_for_engine: weights not found for {sorted(missing)[:5]}")
        return {k: out[k] for k in sorted(out)} if on_this_rank else {}

    def export_hf(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """Write an HF checkpoint directory (config, safetensors, tokenizer) of the current weights.

        All ranks call it (ZeRO-3 gathers); rank 0 writes into a temporary sibling directory
        and renames it to ``path``, replacing an older export there. ``durable=False`` is a
        weight hand-off to the engines, re-exported if the machine goes down: no fsyncs, and an
        earlier hand-off of the same layout at ``path`` is overwritten in place
        (``overwrite_safetensors``), so the caller must not let a reader read ``path`` meanwhile.
        """
        path = Path(path)
        # Written out before this returns, so the parameters themselves can be (no copy).
        state = self.state_dict_for_engine(on_this_rank=self.rank == 0, copy=False)
        in_place = self.rank == 0 and not durable and overwrite_safetensors(path, state)
        if self.rank == 0 and not in_place:
            tmp = path.with_name(f".{path.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_hf(tmp, state)
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

    def _write_hf(self, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        copy_tokenizer_files(self.model_path, out_dir)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write weights, optimizer, scheduler, RNG state and step counter under ``path``.

        Layout: ``hf/`` (HF safetensors of the current weights, usable on their own),
        ``deepspeed/`` (DeepSpeed's engine checkpoint: each rank's optimizer partition, the
        scheduler, fp32 master weights), ``rng_rank{r}.pt`` and ``relayrl_backend.json``.
        Everything is written into ``.<name>.partial`` next to ``path``; rank 0 writes the
        json last, fsyncs, and renames the directory to ``path``. A crash before the rename
        leaves no ``path`` at all, so ``load`` cannot see half a checkpoint. ``path`` must not
        exist (or be an empty directory) and be on a filesystem every rank sees. All ranks call it.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"save: {path} already exists and is not an empty directory; save into a fresh path")
        tmp = path.with_name(f".{path.name}.partial")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
            tmp.mkdir(parents=True)
        distributed.barrier()
        if self.role != "reference":  # a frozen model has no training state beyond its weights in hf/
            self.engine.save_checkpoint(str(tmp), tag=_DS_TAG, client_state={}, save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self.export_hf(tmp / "hf")
        distributed.barrier()
        if self.rank == 0:
            meta = {
                "format": CHECKPOINT_FORMAT,
                "role": self.role,
                "global_step": self.global_step,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "dtype": str(self.dtype).removeprefix("torch."),
            }
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        distributed.barrier()

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore everything ``save`` wrote; training then continues bit-identically.

        The checkpoint must come from a backend of the same role and world size (ZeRO
        partitions are per rank); to change either, build a new backend from ``path/hf``.
        """
        path = Path(path)
        meta_file = path / _META
        if not meta_file.is_file():
            raise FileNotFoundError(f"load: {path} is not a complete backend checkpoint (no {_META}); it was never saved or its save did not finish")
        meta = json.loads(meta_file.read_text())
        for key, mine in (("role", self.role), ("world_size", self.world_size)):
            if meta[key] != mine:
                raise ValueError(f"load: {path} was saved with {key}={meta[key]!r}, this backend has {key}={mine!r}")
        if self.role == "reference":
            self._load_hf_weights(path / "hf")
        else:
            load_path, _ = self.engine.load_checkpoint(str(path), tag=_DS_TAG)
            if load_path is None:
                raise RuntimeError(f"load: DeepSpeed found no checkpoint under {path / _DS_TAG}")
        _set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        self.global_step = int(meta["global_step"])
        self.engine.eval()

    def _load_hf_weights(self, hf_dir: Path) -> None:
        """Copy the safetensors weights of ``hf_dir`` into the module (ZeRO-3: into the partitions)."""
        import deepspeed
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(hf_dir.glob("*.safetensors")):
            state.update(load_file(f))
        loaded: set[int] = set()
        for mod_name, mod in self.engine.module.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            params = list(mod.named_parameters(recurse=False))
            ctx = (
                deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
                if params and self.zero_stage == 3
                else nullcontext()
            )
            with ctx, torch.no_grad():
                for name, t in params + list(mod.named_buffers(recurse=False)):
                    if prefix + name in state:
                        t.copy_(state[prefix + name])
                        loaded.add(id(t))
        missing = [k for k, t in self.engine.module.state_dict(keep_vars=True).items() if id(t) not in loaded]
        if missing:
            raise RuntimeError(f"load: {hf_dir} has no weights for {missing[:5]}")

    def close(self) -> None:
        """Release the engine (hooks, optimizer state); the backend is unusable afterwards."""
        self.engine.destroy()
        del self.engine, self.module


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
