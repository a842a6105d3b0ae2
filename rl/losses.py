"""PPO losses as pure per-token functions, and the reductions that turn them into a scalar.

Every loss here returns a per-token tensor (b, t) that is 0 where ``loss_mask`` is 0 (never
NaN, whatever garbage sits in masked positions), plus per-token indicator tensors for metrics.
Turning per-token values into the minibatch loss is a separate, named choice: ``reduce_loss``.

Notation
    logp      = log pi_theta(a_t | s_t)          current policy, (b, t)
    logp_old  = log pi_old(a_t | s_t)            the policy that sampled (or its recomputation)
    logp_ref  = log pi_ref(a_t | s_t)            the reference (initial) policy
    rho       = exp(logp - logp_old)             importance ratio
    A         = advantage, (b, t)
    eps_low, eps_high                            ratio clip below / above 1 (clip-higher)
    c         = dual-clip constant (> 1)
    V, V_old, R = values, values at sampling time, return targets, (b, t)

Policy (PPO, Schulman et al. 2017, arXiv:1707.06347, eq. 7; clip-higher with separate
eps_low / eps_high from DAPO, Yu et al. 2025, arXiv:2503.14476, §3.1 "Clip-Higher"):
    L_clip = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))
Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
Learning", AAAI, arXiv:1912.09729, "dual-clip PPO"): for A < 0 the loss is further bounded
by -c * A, so one token whose ratio exploded (stale or off-policy sample) cannot dominate the update:
    L = min(L_clip, -c * A)   if A < 0,   L_clip otherwise.
The log-ratio is clamped to [-20, 20] before the exp (``LOG_RATIO_CLAMP``; verl's
``compute_policy_loss`` does the same): rho = exp(clamp(logp - logp_old, -20, 20)). Old
logprobs from the engine (``algorithm.old_logprobs: engine``) come from other kernels and maybe
older weights, so a token the engine found unlikely (logp_old = -95) that the trainer finds
likely (logp = -0.5) has a log-ratio of 94.5: exp overflows to inf, and with A < 0 the loss and
its gradient are inf; with dual clip the loss is the finite bound but the gradient is NaN (the
backward of ``where`` multiplies the unselected branch's inf by 0). Clamped, such a token's loss
is finite and its gradient 0 (the clamp is flat there), as a clipped token's is; without dual
clip its loss value, exp(20) * |A| (about 4.9e8 |A|), still shows in ``pg_loss``, a visible sign
of old logprobs that disagree. Within [-20, 20] the clamp is the identity: every result is
bit-for-bit the unclamped formula's.
Value (clipped value loss of OpenAI baselines' PPO2; discussed in Engstrom et al. 2020,
"Implementation Matters in Deep Policy Gradients", arXiv:2005.12729):
    L_V = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
KL to the reference, estimated on the sampled token (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html), with log_r = logp_ref - logp:
    k1 = -log_r,   k2 = 0.5 * log_r^2,   k3 = (exp(log_r) - 1) - log_r
k1 is unbiased for KL(pi || pi_ref) but can be negative; k3 is unbiased and always >= 0;
k2 is biased but low-variance.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]

LOG_RATIO_CLAMP = 20.0
"""Bound of |logp - logp_old| before the exp in ``policy_loss`` (module docstring). exp(20) is
about 4.9e8: finite in the float32 the backends compute logprobs in, and far past any clip
range, so no token whose ratio the clip or the dual clip acts on normally is changed."""


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, exactly 0 elsewhere (``where`` rather than ``*``: inf * 0 is NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate with clip-higher and optional dual clip (module docstring).

    Args:
        logprobs:     (b, t) logp, with grad.
        old_logprobs: (b, t) logp_old.
        advantages:   (b, t) A.
        loss_mask:    (b, t) 1 = action token.
        clip_low, clip_high: eps_low, eps_high (>= 0).
        dual_clip:    c > 1, or None for off.

    Returns:
        per_token_loss: (b, t), 0 where loss_mask is 0.
        metrics: per-token float tensors (b, t), 0 where loss_mask is 0:
            ``clipped_low``  1 where A < 0 and rho < 1 - eps_low (the clip took the gradient away),
            ``clipped_high`` 1 where A > 0 and rho > 1 + eps_high,
            ``dual_clipped`` 1 where the dual-clip bound -c * A was taken,
            ``ratio``        rho (with the log-ratio clamped to +-``LOG_RATIO_CLAMP``),
            ``approx_kl``    0.5 * (logp - logp_old)^2 per action token: Schulman's k2
                             estimator (module docstring, with log_r = logp - logp_old) of how
                             far the policy moved from the one that sampled, KL(pi_old || pi),
                             on the sampled token. Always >= 0 (k2 is biased but never
                             negative, unlike k1), 0 where the two agree; taken from the
                             unclamped log-ratio so it shows the real drift. ``rl.ppo`` logs its
                             mean over the minibatch's action tokens (loss_mask 1), whatever
                             the loss reduction.
        The clip fraction is (clipped_low + clipped_high) summed and divided by the token count.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    mask = loss_mask.bool()
    log_ratio = _masked(logprobs - old_logprobs, mask)
    # Clamped before the exp: an engine's old logprob far below the trainer's would make rho
    # inf, and the loss and gradient inf or NaN (module docstring). Identity within the bound.
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = _masked(advantages, mask)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    f = logprobs.dtype
    metrics = {
        "clipped_low": ((adv < 0) & (ratio < 1.0 - clip_low) & mask).to(f),
        "clipped_high": ((adv > 0) & (ratio > 1.0 + clip_high) & mask).to(f),
        "dual_clipped": (dual & mask).to(f),
        "ratio": _masked(ratio.detach(), mask),
        "approx_kl": _masked(0.5 * log_ratio.detach() ** 2, mask),
    }
    return _masked(loss, mask), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (module docstring).

    Args:
        values:     (b, t) V, with grad.
        old_values: (b, t) V_old (the critic's values when the advantages were computed).
        returns:    (b, t) R.
        mask:       (b, t) 1 = a state whose value is trained.
        value_clip: eps_v, or None for the plain 0.5 * (V - R)^2.

    Returns:
        per_token_loss: (b, t), 0 where mask is 0.
        metrics: ``clipped`` (b, t) 1 where the clipped term was the larger one (its gradient
        is 0 there), ``error`` (b, t) V - R.
    """
    m = mask.bool()
    unclipped = (values - returns) ** 2
    if value_clip is None:
        loss = 0.5 * unclipped
        clipped_ind = torch.zeros_like(m)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (v_clipped - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clipped_ind = clipped > unclipped
    metrics = {
        "clipped": (clipped_ind & m).to(values.dtype),
        "error": _masked((values - returns).detach(), m),
    }
    return _masked(loss, m), metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate on the sampled token (module docstring).

    logprobs (with grad), ref_logprobs: (b, t). Returns (b, t). Unmasked: pass 0 in both at
    masked positions (the padding convention) and the result is 0 there.
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def reduction_normaliser(mode: Reduction, num_tokens: int, num_sequences: int, constant: float) -> float:
    """The global divisor ``reduce_loss`` needs for ``mode``: the minibatch's action-token
    count (token_mean), its sequence count (the two seq_mean modes), or the constant."""
    if mode == "token_mean":
        return float(max(num_tokens, 1))
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return float(max(num_sequences, 1))
    if mode == "constant":
        return float(constant)
    raise ValueError(f"unknown loss reduction {mode!r}")


def reduce_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, mode: Reduction, normaliser: float) -> torch.Tensor:
    """Reduce a per-token loss of one micro-batch to its share of the minibatch loss.

    Args:
        per_token: (b, t).
        loss_mask: (b, t) 1 = counts.
        mode:
            ``token_mean``          sum over tokens / normaliser (= the minibatch's token count):
                                    every token weighs the same (DAPO's token-level loss).
            ``seq_mean_token_mean`` sum over sequences of each sequence's token mean /
                                    normaliser (= the minibatch's sequence count): every
                                    sequence weighs the same (the original GRPO).
            ``seq_mean_token_sum``  sum over sequences of each sequence's token *sum* /
                                    normaliser (= the minibatch's sequence count): every token
                                    weighs the same, and the scale grows with the sequences'
                                    lengths, not with their number (verl's
                                    ``seq-mean-token-sum``; ``constant`` with the sequence
                                    count as the constant).
            ``constant``            sum over tokens / normaliser (a fixed constant; Dr. GRPO),
                                    so the loss scale does not depend on lengths.
        normaliser: the *global* divisor for the whole minibatch (``reduction_normaliser``).

    Returns a 0-d tensor. Because each micro-batch divides by the global normaliser (and a
    sequence never straddles micro-batches), the micro-batches' results sum to the value of the
    whole minibatch reduced at once.
    """
    if normaliser <= 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    mask = loss_mask.bool()
    summed = _masked(per_token, mask)
    if mode in ("token_mean", "seq_mean_token_sum", "constant"):
        return summed.sum() / normaliser  # the sum of the per-sequence sums, over the global divisor
    if mode == "seq_mean_token_mean":
        per_seq_count = mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)
        return (summed.sum(dim=-1) / per_seq_count).sum() / normaliser
    raise ValueError(f"unknown loss reduction {mode!r}")


def gradient_shares(num_tokens: torch.Tensor, mode: Reduction, constant: float) -> torch.Tensor:
    """Each sequence's share of the loss weight under ``mode``: the sum of the weights
    ``reduce_loss`` gives its tokens, over the batch's total.

    num_tokens: (b,) action tokens per sequence (sub-trace). Returns (b,) shares summing to 1
    (all 0 for an empty batch). token_mean, seq_mean_token_sum and constant weigh every token
    alike, so a sub-trace's share is its token fraction n_i / N; seq_mean_token_mean weighs every
    sequence alike, 1 / B. With compaction, the first tells how much the long sub-traces dominate.
    """
    n = num_tokens.to(torch.float64)
    if mode in ("token_mean", "seq_mean_token_sum", "constant"):
        weights = n  # every token 1 / normaliser; the normaliser cancels in the share
    elif mode == "seq_mean_token_mean":
        weights = (n > 0).to(torch.float64)
    else:
        raise ValueError(f"unknown loss reduction {mode!r}")
    total = weights.sum()
    return weights / total if total > 0 else torch.zeros_like(weights)
