"""Generalized Advantage Estimation over the action tokens of right-padded sequences.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", arXiv:1506.02438, eq. 16) with a token-level MDP: each action token is one
step. Observation tokens inside a response (tool output, dummy output, summary scaffolding:
``loss_mask == 0``) are not steps of the agent: the recursion *skips* them. The "next state"
of the last action token of turn k is the state in which the first action token of turn k+1
is sampled; no reward and no discount are spent on the tokens in between.

Notation (one sequence, its action tokens at positions p_1 < ... < p_n)
    r_k     = rewards[p_k]            reward of action step k (rewards elsewhere are ignored)
    V_k     = values[p_k]             value of the state in which step k was sampled
    V_{n+1} = bootstrap               value of the state after the sequence (0 if terminal)
    A_{n+1} = next_advantage          advantage carried in from a following segment (0 if none)
    delta_k = r_k + gamma * V_{k+1} - V_k                                   (GAE §3)
    A_k     = delta_k + gamma * lam * A_{k+1}                               (GAE eq. 16)
    R_k     = A_k + V_k               the critic's return target (lambda-return)

Chaining segments (compaction): a trajectory cut into sub-traces s_1, ..., s_m is processed
from the last to the first; for sub-trace i pass ``bootstrap`` = the value of the first
action state of s_{i+1} and ``next_advantage`` = the advantage of the first action token of
s_{i+1}. The result equals GAE over the uncut trajectory exactly, for any gamma and lambda
(``first_action_value`` picks both). With ``next_advantage`` left at 0 the cut is a plain
bootstrap, exact only for lambda = 0; that is what bootstrapping the end of a truncated episode
is (no later segment to carry from), never what a compaction cut should be.

Decoupled lambdas (VC-PPO: Yuan et al. 2025, "What's Behind PPO's Collapse in Long-CoT? Value
Optimization Holds the Secret", arXiv:2503.01491, "Decoupled-GAE") are two calls of ``gae``: the actor's
advantages with lam_actor, the critic's return targets with lam_critic (``gae_actor_critic``).
"""

from __future__ import annotations

import torch

Lambda = float | torch.Tensor


def _as_row_tensor(x: Lambda | None, b: int, like: torch.Tensor) -> torch.Tensor:
    """A float, a 0-d or a (b,) tensor -> (b,) tensor of ``like``'s dtype and device."""
    if x is None:
        return torch.zeros(b, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(b).clone()
    if t.shape != (b,):
        raise ValueError(f"expected a float or a ({b},) tensor, got shape {tuple(t.shape)}")
    return t


def _on_actions(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, exactly 0 elsewhere (``where``, not ``*``: garbage may be inf or NaN)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check(rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != loss_mask.shape:
        raise ValueError(
            "rewards, values and loss_mask must all be (b, t); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(loss_mask.shape)}"
        )


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    bootstrap: torch.Tensor | None,
    gamma: float,
    lam: Lambda,
    next_advantage: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain per-sequence loop, kept as the definition ``gae`` is tested against.

    Same arguments and results as ``gae``.
    """
    _check(rewards, values, loss_mask)
    b, t = rewards.shape
    like = values.to(torch.float64)  # a float lambda is used as given, not rounded to float32
    lam_b = _as_row_tensor(lam, b, like)
    boot = _as_row_tensor(bootstrap, b, like)
    carry = _as_row_tensor(next_advantage, b, like)
    advantages = torch.zeros_like(values)
    for row in range(b):
        next_value = float(boot[row])
        adv = float(carry[row])
        for i in reversed(range(t)):
            if not loss_mask[row, i]:
                continue  # observation token: skipped, not a step
            delta = float(rewards[row, i]) + gamma * next_value - float(values[row, i])
            adv = delta + gamma * float(lam_b[row]) * adv
            advantages[row, i] = adv
            next_value = float(values[row, i])
    return advantages, _on_actions(advantages + values, loss_mask.bool())


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    bootstrap: torch.Tensor | None,
    gamma: float,
    lam: Lambda,
    next_advantage: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over action tokens, batched (see the module docstring for the recursion).

    Args:
        rewards:   (b, t) per-token rewards; only positions with loss_mask 1 are read.
        values:    (b, t) value of the state in which token i was sampled; read where loss_mask 1.
        loss_mask: (b, t) 1 = action token (a step of the recursion), 0 = skipped.
        bootstrap: (b,) value of the state after the sequence; 0 for a terminal sequence.
            None = all 0.
        gamma:     discount per action token.
        lam:       GAE lambda: a float or a (b,) tensor (e.g. ``length_adaptive_lambda``).
        next_advantage: (b,) advantage carried in from the next segment of the same trajectory
            (see "Chaining segments" above); None = all 0.
        chunk:     block size of the scan; any value gives the same result.

    Returns:
        advantages: (b, t), 0 where loss_mask is 0.
        returns:    (b, t) = advantages + values, 0 where loss_mask is 0.

    How: the action tokens of every row are gathered to the left (a stable sort on the mask),
    the backward recursion is solved within blocks of ``chunk`` steps at once as a triangular
    matrix product, W[i, j] = (gamma * lam)^(j - i) for j >= i, and only the carry between
    blocks is sequential (t / chunk steps). Computed in float64, so long sequences do
    not drift from the reference.
    """
    _check(rewards, values, loss_mask)
    b, t = rewards.shape
    out_dtype = values.dtype
    work = torch.float64
    mask = loss_mask.bool()
    rewards_w = rewards.to(work)
    values_w = values.to(work)
    g = gamma * _as_row_tensor(lam, b, values_w)  # (b,)
    boot = _as_row_tensor(bootstrap, b, values_w)
    carry_in = _as_row_tensor(next_advantage, b, values_w)

    # Gather the action steps of each row to the left, in order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (b, t)
    n = mask.sum(dim=1)  # (b,) action steps per row
    n_max = int(n.max()) if b > 0 else 0
    if n_max == 0:
        zeros = torch.zeros_like(values)
        return zeros, zeros.clone()
    order = order[:, :n_max]
    steps = torch.arange(n_max, device=values.device).expand(b, n_max)
    valid = steps < n[:, None]  # (b, n_max)
    r_c = _on_actions(torch.gather(rewards_w, 1, order), valid)
    v_c = _on_actions(torch.gather(values_w, 1, order), valid)

    # V_{k+1}: the next step's value, or the bootstrap after the last step.
    v_next = torch.zeros_like(v_c)
    v_next[:, :-1] = v_c[:, 1:]
    is_last = steps == (n[:, None] - 1)
    v_next = torch.where(is_last, boot[:, None].expand_as(v_next), v_next)
    delta = _on_actions(r_c + gamma * v_next - v_c, valid)

    # One extra slot per row after its last step holds the carried-in advantage A_{n+1}: with
    # delta = A_{n+1} there and 0 beyond, the recursion gives exactly A_{n+1} in that slot.
    width = n_max + 1
    num_blocks = -(-width // chunk)
    padded = torch.zeros(b, num_blocks * chunk, dtype=work, device=values.device)
    padded[:, :n_max] = delta
    padded.scatter_(1, n[:, None], carry_in[:, None])
    blocks = padded.view(b, num_blocks, chunk)

    idx = torch.arange(chunk, device=values.device)
    power = (idx[None, :] - idx[:, None]).to(work)  # (c, c): j - i
    upper = power >= 0
    gb = g[:, None, None]
    zero = torch.zeros((), dtype=work, device=values.device)
    w = torch.where(upper, gb.pow(power.clamp(min=0)), zero)  # (b, c, c)
    local = torch.einsum("bij,bkj->bki", w, blocks)  # (b, blocks, c): within-block sums
    tail = gb[:, :, 0].pow((chunk - idx).to(work)[None, :])  # (b, c): g^(c - i)

    adv_blocks = torch.empty_like(local)
    following = torch.zeros(b, dtype=work, device=values.device)  # A at the next block's start
    for k in reversed(range(num_blocks)):
        adv_blocks[:, k] = local[:, k] + tail * following[:, None]
        following = adv_blocks[:, k, 0]
    adv_c = _on_actions(adv_blocks.reshape(b, -1)[:, :n_max], valid)

    advantages = torch.zeros(b, t, dtype=work, device=values.device)
    advantages.scatter_(1, order, adv_c)  # invalid slots write 0 onto non-action positions
    advantages = advantages.to(out_dtype)
    return advantages, _on_actions(advantages + values, mask)


def gae_actor_critic(
    rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    bootstrap: torch.Tensor | None,
    gamma: float,
    lam_actor: Lambda,
    lam_critic: Lambda,
    next_advantage_actor: torch.Tensor | None = None,
    next_advantage_critic: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled GAE (VC-PPO, arXiv:2503.01491; VAPO, arXiv:2504.05118, "Decoupled-GAE"): the
    policy learns from lam_actor advantages; the critic regresses onto lam_critic returns
    (lam_critic = 1 keeps the reward signal undecayed along long responses).

    Shapes as ``gae``. The two carries are the ``next_advantage`` of each call when segments
    are chained: the actor's and the critic's (= critic return - value) advantage of the next
    segment's first action token.

    Returns (advantages (b, t) for the actor, returns (b, t) for the critic).
    """
    advantages, _ = gae(rewards, values, loss_mask, bootstrap, gamma, lam_actor, next_advantage_actor)
    _, returns = gae(rewards, values, loss_mask, bootstrap, gamma, lam_critic, next_advantage_critic)
    return advantages, returns


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """VAPO's length-adaptive policy lambda (Yue et al. 2025, "VAPO: Efficient and Reliable
    Reinforcement Learning for Advanced Reasoning Tasks", arXiv:2504.05118, "Length-Adaptive GAE"):
    ``lam = 1 - 1 / (alpha * length)``, so that the weights of the TD errors sum to about
    ``alpha * length`` whatever the length; clamped to [0, 1] (short sequences get 0).

    lengths: (b,) number of action tokens per sequence. Returns (b,) float lambdas.
    """
    lengths = lengths.to(torch.float64)
    lam = 1.0 - 1.0 / (alpha * lengths.clamp(min=1e-12))
    return lam.clamp(0.0, 1.0).to(torch.get_default_dtype())


def first_action_value(x: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``x`` at the first action token of each row, 0 for a row without one.

    x, loss_mask: (b, t). Returns (b,). With ``x = values`` this is the bootstrap a preceding
    segment needs; with ``x = advantages`` it is that segment's ``next_advantage``.
    """
    mask = loss_mask.bool()
    first = mask.to(torch.int8).argmax(dim=1)
    picked = torch.gather(x, 1, first[:, None])[:, 0]
    return torch.where(mask.any(dim=1), picked, torch.zeros_like(picked))
