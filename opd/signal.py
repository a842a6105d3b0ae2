"""The on-policy distillation signal: per-token reverse KL to a teacher, as pure tensor functions.

Notation
    x_t        the token the student sampled at position t (on-policy: the student's own rollout)
    logp_s     = log pi_student(x_t | x_<t)         (b, t), the student's logprob of it
    logp_T     = log pi_teacher(x_t | x_<t)         (b, t), the routed teacher's logprob of it
    coef       the distillation coefficient
    A_task     an optional task advantage (GAE or group-relative), (b, t)

Reverse KL on the sampled token (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, eq. 2 with the reverse KL of
§3; Gu et al. 2024, MiniLLM, arXiv:2306.08543, eq. 1): KL(pi_s || pi_T) at a state is
E_{x ~ pi_s}[logp_s(x) - logp_T(x)], so ``logp_s(x_t) - logp_T(x_t)`` on the token the student
drew is its one-sample (k1) estimate. Used as a negative per-token reward, it is a dense signal:

    adv_t = clip(-coef * (logp_s(x_t) - logp_T(x_t)), -c, c)          (c: the advantage clip)
    adv_t = adv_t + A_task_t                                           (when the task adds in)

and the student is trained on adv_t with the same importance-ratio / clipped policy-gradient
loss as RL (``rl.losses.policy_loss``). The per-token form (no return over later tokens) is
the usual choice in on-policy distillation (Thinking Machines 2025, "On-Policy Distillation");
each token is credited with its own divergence only.

A baseline (optional, ``subtract_baseline``): the distillation advantage of a token the teacher
dislikes is large and negative, and from a student far from its teacher almost every sampled
token is one, so the raw signal is mostly "push down what you sampled", a high-variance way to
find the teacher's mode. Subtracting the batch mean b of the distillation advantages (a
constant baseline, Williams 1992, "Simple statistical gradient-following algorithms", §4;
E[grad log pi(x) * b] = 0, so the expected gradient is unchanged up to the O(1/N) dependence
of b on the sample itself) leaves the few tokens the teacher likes clearly positive:

    adv_t = clip(-coef * (logp_s - logp_T), -c, c) - b + A_task_t,   b = mean over action tokens

Every function returns 0 where ``loss_mask`` is 0 (prompt, observations, padding), whatever sits
in those positions.
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def opd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    coef: float | torch.Tensor,
    clip: float | None = None,
    task_advantages: torch.Tensor | None = None,
    baseline: bool = False,
) -> torch.Tensor:
    """Per-token distillation advantages (module docstring).

    Args:
        student_logprobs: (b, t) logp_s of the sampled tokens (no grad needed).
        teacher_logprobs: (b, t) logp_T of the same tokens.
        loss_mask:        (b, t) 1 = a token the student sampled and is trained on.
        coef:             coef (>= 0): a float, or a tensor broadcastable to (b, t), e.g. (b, 1)
                          for a per-sample coefficient (a teacher's weight times coef).
        clip:             c > 0 bounds the distillation term to [-c, c] before the task
                          advantage is added; None = no clip.
        task_advantages:  (b, t) A_task to add, or None.
        baseline:         subtract the batch mean of the (clipped) distillation term first.

    Returns:
        (b, t) adv_t, 0 where loss_mask is 0.
    """
    if bool((torch.as_tensor(coef) < 0).any()):
        raise ValueError(f"coef must be >= 0, got {coef}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    mask = loss_mask.bool()
    adv = -coef * _masked(student_logprobs - teacher_logprobs, mask)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    if baseline:
        adv = subtract_baseline(adv, mask)
    if task_advantages is not None:
        adv = adv + _masked(task_advantages, mask)
    return _masked(adv, mask)


def subtract_baseline(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) ``advantages - mean`` where the mean is over the action tokens of the whole batch
    (module docstring); 0 where ``loss_mask`` is 0 (and all 0 for a batch without action tokens)."""
    mask = loss_mask.bool()
    n = mask.sum()
    if int(n) == 0:
        return torch.zeros_like(advantages)
    mean = _masked(advantages, mask).sum() / n
    return _masked(advantages - mean, mask)


def opd_advantages_reference(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    coef: float | torch.Tensor,
    clip: float | None = None,
    task_advantages: torch.Tensor | None = None,
    baseline: bool = False,
) -> torch.Tensor:
    """``opd_advantages`` written one token at a time, the definition it is tested against."""
    b, t = student_logprobs.shape
    coefs = torch.as_tensor(coef, dtype=torch.float64).broadcast_to((b, t))
    out = torch.zeros(b, t, dtype=student_logprobs.dtype)
    for i in range(b):
        for j in range(t):
            if not bool(loss_mask[i, j]):
                continue
            a = -float(coefs[i, j]) * (float(student_logprobs[i, j]) - float(teacher_logprobs[i, j]))
            if clip is not None:
                a = min(max(a, -clip), clip)
            out[i, j] = a
    if baseline:
        picked = [float(out[i, j]) for i in range(b) for j in range(t) if bool(loss_mask[i, j])]
        mean = sum(picked) / len(picked) if picked else 0.0
        for i in range(b):
            for j in range(t):
                if bool(loss_mask[i, j]):
                    out[i, j] -= mean
    if task_advantages is not None:
        for i in range(b):
            for j in range(t):
                if bool(loss_mask[i, j]):
                    out[i, j] += float(task_advantages[i, j])
    return out


def clipped_fraction(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                     coef: float | torch.Tensor, clip: float | None) -> torch.Tensor:
    """0-d: the fraction of action tokens whose distillation term the clip bounded."""
    mask = loss_mask.bool()
    if clip is None:
        return torch.zeros((), dtype=torch.float64)
    raw = -coef * _masked(student_logprobs - teacher_logprobs, mask)
    return ((raw.abs() > clip) & mask).sum().to(torch.float64) / mask.sum().clamp(min=1)


def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       loss_mask: torch.Tensor) -> torch.Tensor:
    """(b,) per-sequence mean of the k1 reverse-KL estimate ``logp_s - logp_T`` over its action
    tokens (0 for a sequence without one). A metric: unbiased for the mean per-token KL(pi_s ||
    pi_T) along the student's own samples, but single draws can be negative."""
    mask = loss_mask.bool()
    per_token = _masked(student_logprobs - teacher_logprobs, mask)
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1).to(per_token.dtype)


def exact_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Per-position KL(pi_s || pi_T) = sum_v p_s(v) (log p_s(v) - log p_T(v)) over the whole
    vocabulary, for evaluation (no sampling noise).

    Args:
        student_logits, teacher_logits: (b, t, V) next-token logits at the same positions.
        mask: (b, t) 1 = a position that counts.

    Returns (b, t) >= 0, 0 where mask is 0.
    """
    logp_s = torch.log_softmax(student_logits.double(), dim=-1)
    logp_t = torch.log_softmax(teacher_logits.double(), dim=-1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return _masked(kl.clamp(min=0.0), mask).to(student_logits.dtype)
