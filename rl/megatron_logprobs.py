"""Log-probabilities and entropies from vocabulary-sharded logits (tensor parallel), no gather.

With TP, each rank holds the logits of its slice of the vocabulary. Gathering them gives every
rank a full ``(tokens, vocab)`` tensor; this computes the same two quantities with three
all-reduces of ``(tokens,)`` vectors instead.

Notation (one row, temperature already applied: ``x = logits / temperature``)
---------------------------------------------------------------------------
``m = max_j x_j`` (all-reduce MAX), ``s = sum_j exp(x_j - m)`` (all-reduce SUM),
``lse = m + log s``, ``p_j = exp(x_j - lse)``, ``x_t`` the target's logit (all-reduce SUM of
the one rank's value), ``E = sum_j p_j x_j`` (all-reduce SUM).

    log p_t = x_t - lse                    d/dx_j = 1[j = t] - p_j
    H       = lse - E                      d/dx_j = -p_j (x_j - E)

(the second from dlse/dx_j = p_j and dE/dx_j = p_j + p_j x_j - p_j E). Both gradients are local
to a rank's slice, so the backward needs no communication; the column-parallel output layer's
own backward all-reduces the gradient of its input. Columns past the true vocabulary (TP
padding) are excluded as -inf.

``token_logprobs_and_entropy`` in ``rl/deepspeed_backend.py`` is the reference (full logits);
``tests/test_megatron_backend.py`` checks the two agree, values and gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int, group):
        # x: (n, Vr) fp32 temperature-scaled logits of this rank's slice [vocab_start, vocab_start + Vr).
        n, vr = x.shape
        cols = torch.arange(vocab_start, vocab_start + vr, device=x.device)
        valid = cols < vocab_size
        x = x.masked_fill(~valid[None, :], float("-inf"))
        m = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m[:, None])
        s = e.sum(-1)
        local = (targets >= vocab_start) & (targets < vocab_start + vr)
        idx = (targets - vocab_start).clamp(0, vr - 1)
        x_t = torch.where(local, x.gather(-1, idx[:, None]).squeeze(-1), torch.zeros_like(m))
        ex = torch.where(valid[None, :], e * x, torch.zeros_like(e)).sum(-1)
        if group is not None:
            packed = torch.stack([s, x_t, ex])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            s, x_t, ex = packed[0], packed[1], packed[2]
        lse = m + torch.log(s)
        p = e / s[:, None]
        big_e = ex / s
        ctx.save_for_backward(p, x.masked_fill(~valid[None, :], 0.0), big_e, idx, local)
        return x_t - lse, lse - big_e

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor, g_ent: torch.Tensor):
        p, x, big_e, idx, local = ctx.saved_tensors
        grad = -p * g_logp[:, None] - g_ent[:, None] * p * (x - big_e[:, None])
        hit = torch.zeros_like(p).scatter_(-1, idx[:, None], 1.0) * local[:, None].to(p.dtype)
        grad = grad + hit * g_logp[:, None]
        return grad, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, vocab_size: int, group=None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``deepspeed_backend.token_logprobs_and_entropy``, from this rank's vocabulary slice.

    Args:
        logits: (b, t, Vr) this rank's slice of the next-token logits, columns
            ``[vocab_start, vocab_start + Vr)``; columns at or past ``vocab_size`` are padding.
        tokens: (b, t) token ids.
        group: the tensor-parallel process group (None: a single rank holding the whole vocabulary).

    Returns:
        logprobs, entropy: (b, t) fp32, position i about ``tokens[i]`` given ``tokens[:i]``;
        position 0 is 0.0. Identical on every rank of the group.
    """
    b, t, vr = logits.shape
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    x = logits.float().reshape(b * t, vr) / temperature
    lp, ent = _VocabParallelLogprobEntropy.apply(x, targets.reshape(-1), vocab_start, vocab_size, group)
    lp, ent = lp.reshape(b, t), ent.reshape(b, t)
    zero = lp.new_zeros(b, 1)
    return torch.cat([zero, lp[:, :-1]], dim=1), torch.cat([zero, ent[:, :-1]], dim=1)
