"""Masked statistics and critic-free (group-relative) advantages. Pure tensor functions.

Notation
    mask  (b, t): 1 = the entry counts (``loss_mask`` polarity everywhere), 0 = ignored.
    r_i         : scalar reward of episode i; g(i) its group (the episodes of one task).
    mu_g, sigma_g: mean and standard deviation of the rewards in group g.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2 "outcome supervision"):
    A_i = (r_i - mu_g(i)) / (sigma_g(i) + eps), the same for every action token of episode i.
Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
arXiv:2503.20783, "Dr. GRPO") drops the division by sigma: A_i = r_i - mu_g(i), which removes
the extra weight of groups whose rewards barely differ (nearly all right or all wrong).
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where mask is 1 (whatever, even inf or NaN, sits elsewhere).
    x, mask: same shape. dim None -> 0-d tensor."""
    xm = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of entries where mask is 1 (as a float tensor)."""
    m = mask.to(torch.get_default_dtype())
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over mask-1 entries; 0 where there are none (not NaN)."""
    count = masked_count(mask, dim).to(x.dtype)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all mask-1 entries (0-d). Bessel-corrected when ``unbiased``;
    0 when fewer than two entries (one value has no spread)."""
    mean = masked_mean(x, mask)
    n = masked_count(mask).to(x.dtype)
    ss = masked_sum((x - mean) ** 2, mask)
    denom = n - 1 if unbiased else n
    return torch.where(n > 1, ss / denom.clamp(min=1), torch.zeros_like(ss))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / (std + eps) over the mask-1 entries of the whole tensor; 0 where mask is 0.

    ``shift_mean=False`` only rescales (keeps the sign of every advantage).
    x, mask: same shape, any rank. Returns the shape of x.
    """
    mean = masked_mean(x, mask)
    std = masked_var(x, mask).sqrt()
    centred = x - mean if shift_mean else x
    out = centred / (std + eps)
    return torch.where(mask.bool(), out, torch.zeros((), dtype=x.dtype, device=x.device))


def group_relative_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO / Dr. GRPO advantages of whole episodes (see the module docstring).

    Args:
        rewards:   (n,) one scalar reward per episode.
        group_ids: (n,) int64, the group (task) of each episode; any order, any group sizes.
        normalize_std: divide by the group's std (GRPO); False = Dr. GRPO.
        eps: added to the std.

    Returns (n,) advantages. sigma is the Bessel-corrected std of the group (as
    ``torch.std``). A group whose rewards are all equal (or that has one episode) carries no
    signal and gets advantage 0, whatever eps.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be (n,); got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    work = rewards.to(torch.float64)
    count = torch.zeros(num_groups, dtype=work.dtype, device=work.device).index_add_(0, inverse, torch.ones_like(work))
    total = torch.zeros_like(count).index_add_(0, inverse, work)
    mean = total / count
    centred = work - mean[inverse]
    if not normalize_std:
        return centred.to(rewards.dtype)
    ss = torch.zeros_like(count).index_add_(0, inverse, centred**2)
    std = torch.where(count > 1, (ss / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))[inverse]
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return adv.to(rewards.dtype)


def broadcast_to_tokens(per_sequence: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Put one value per sequence on each of its action tokens.

    per_sequence: (b,); loss_mask: (b, t). Returns (b, t), 0 where loss_mask is 0.
    """
    dtype = per_sequence.dtype if per_sequence.is_floating_point() else torch.get_default_dtype()
    return per_sequence[:, None].to(dtype) * loss_mask.to(dtype)
