"""From trajectories to training samples: alignment of values, rewards and advantages.

This is the one place where per-token quantities are lined up (see ``rl/backend.py``):

- ``logprobs[i]`` is log p(tokens[i] | tokens[:i]);
- the critic's raw output ``raw[i] = V(tokens[:i+1])``, so the value of the state in which
  action token i was sampled is ``raw[i-1]``, and the critic is trained at position i-1 with
  the return of action token i (``value_mask``/``returns``/``old_values`` are state-aligned);
- the task reward sits on the last action token of the last sub-trace of a trajectory.

Across compaction cuts (``chained_gae``): a trajectory's sub-traces are processed from the last
to the first; sub-trace i gets the value of sub-trace i+1's first action state as its
bootstrap and the advantage of that first action as its ``next_advantage``, so the recursion
runs on as if the trajectory had never been cut: with an identity summary (the state after the
cut has the value the uncut state had) the advantages equal the uncut trajectory's exactly.

The last sub-trace of a scored trajectory does not bootstrap: the env scored the episode and
its reward is final, even when a turn or context cap ended it. (Bootstrapping there would add
the critic's guess of rewards the episode can no longer earn.)
"""

from __future__ import annotations

import torch

from relayrl.config import AlgorithmConfig
from relayrl.critic.gae import first_action_value, gae
from relayrl.rl.advantages import group_relative_advantages, masked_whiten
from relayrl.rl.losses import gradient_shares
from relayrl.types import SubTrace, Trajectory

Sample = dict[str, torch.Tensor]


def flatten(groups: list[list[Trajectory]]) -> list[SubTrace]:
    """Trainable sub-traces of the non-failed trajectories, in order."""
    return [s for g in groups for t in g if not t.failed for s in t.sub_traces if s.num_response_tokens > 0]


def base_samples(subs: list[SubTrace]) -> list[Sample]:
    return [
        {
            "tokens": torch.tensor(s.tokens, dtype=torch.long),
            "loss_mask": torch.tensor(s.loss_mask, dtype=torch.long),
            "rollout_logprobs": torch.tensor(s.rollout_logprobs, dtype=torch.float32),
        }
        for s in subs
    ]


def pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Right-pad 1-D tensors to (b, t_max)."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def action_values(raw: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(t,) value of the state each action token was sampled in: raw[i-1]; 0 off the mask."""
    v = torch.zeros_like(raw)
    v[1:] = raw[:-1]
    return v * loss_mask


def chained_gae(subs: list[SubTrace], rewards: torch.Tensor, values: torch.Tensor, masks: torch.Tensor,
                gamma: float, lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over every sub-trace, continued across the cuts between sub-traces of a trajectory.

    rewards, values, masks: (b, t) action-aligned, one row per sub-trace of ``subs``.
    lam: a float or a (b,) tensor. Returns (advantages, returns), (b, t).

    Rows are processed by depth from the end of their trajectory (last segments first), one
    batched ``gae`` call per depth; a row whose next segment is absent (not in ``subs``)
    starts a fresh recursion (bootstrap 0).
    """
    b = len(subs)
    lam_b = torch.as_tensor(lam, dtype=torch.float64).expand(b) if not torch.is_tensor(lam) or lam.dim() == 0 \
        else lam.to(torch.float64)
    row_of = {(s.trajectory_id, s.segment): i for i, s in enumerate(subs)}
    depth = torch.tensor([s.num_segments - 1 - s.segment for s in subs])
    first_value = first_action_value(values, masks)
    first_adv = torch.zeros(b, dtype=values.dtype)
    adv = torch.zeros_like(values)
    ret = torch.zeros_like(values)
    for d in range(int(depth.max()) + 1 if b else 0):
        rows = torch.nonzero(depth == d, as_tuple=False)[:, 0]
        if len(rows) == 0:
            continue
        boot = torch.zeros(len(rows), dtype=values.dtype)
        carry = torch.zeros(len(rows), dtype=values.dtype)
        for k, i in enumerate(rows.tolist()):
            nxt = row_of.get((subs[i].trajectory_id, subs[i].segment + 1))
            if nxt is not None:
                boot[k], carry[k] = first_value[nxt], first_adv[nxt]
        a, r = gae(rewards[rows], values[rows], masks[rows], boot, gamma, lam_b[rows], carry)
        adv[rows], ret[rows] = a, r
        first_adv[rows] = first_action_value(a, masks[rows])
    return adv, ret


def rewards_tensor(subs: list[SubTrace], masks: torch.Tensor) -> torch.Tensor:
    """(b, t) the trajectory reward on the last action token of its last sub-trace."""
    rewards = torch.zeros(masks.shape, dtype=torch.float32)
    for i, s in enumerate(subs):
        if s.segment == s.num_segments - 1:
            last = int(torch.nonzero(masks[i], as_tuple=False)[-1])
            rewards[i, last] = s.reward
    return rewards


def gae_advantages(subs: list[SubTrace], samples: list[Sample], raws: list[torch.Tensor],
                   cfg: AlgorithmConfig) -> dict[str, float]:
    """Fill ``advantages`` (token-aligned) and the critic's state-aligned targets into samples."""
    masks_list = [s["loss_mask"] for s in samples]
    masks = pad(masks_list)
    values = pad([action_values(r, m) for r, m in zip(raws, masks_list, strict=True)])
    rewards = rewards_tensor(subs, masks)
    # VC-PPO: the actor's advantages and the critic's targets use separate lambdas.
    adv, ret = chained_gae(subs, rewards, values, masks, cfg.gamma, cfg.lam_actor)
    if cfg.lam_critic != cfg.lam_actor:
        _, ret = chained_gae(subs, rewards, values, masks, cfg.gamma, cfg.lam_critic)
    raw_adv = adv
    if cfg.normalize_advantages:
        adv = masked_whiten(adv, masks.float())
    for i, s in enumerate(samples):
        t = len(s["tokens"])
        s["advantages"] = adv[i, :t] * masks_list[i]
        # Critic targets at state positions i-1 for each action token i.
        m = masks_list[i]
        value_mask = torch.zeros(t, dtype=torch.long)
        value_mask[:-1] = m[1:]
        returns_state = torch.zeros(t)
        returns_state[:-1] = ret[i, 1:t]
        s["value_mask"] = value_mask
        s["returns"] = returns_state * value_mask
        s["old_values"] = raws[i] * value_mask
    mask_f = masks.float()
    n = mask_f.sum().clamp(min=1)
    return {
        "adv/raw_mean": float((raw_adv * mask_f).sum() / n),
        "adv/returns_mean": float((ret * mask_f).sum() / n),
        "critic/values_mean": float((values * mask_f).sum() / n),
    }


def grpo_advantages(subs: list[SubTrace], samples: list[Sample], cfg: AlgorithmConfig) -> dict[str, float]:
    """Group-relative advantages of each trajectory's reward, on every action token."""
    final = {s.trajectory_id: s for s in subs if s.segment == s.num_segments - 1}
    ids = list(final)
    group_index: dict[str, int] = {}
    gidx = torch.tensor([group_index.setdefault(final[t].group_id, len(group_index)) for t in ids])
    rewards = torch.tensor([final[t].reward for t in ids])
    adv = group_relative_advantages(rewards, gidx, normalize_std=cfg.grpo_normalize_std)
    adv_of = dict(zip(ids, adv.tolist(), strict=True))
    for s, smp in zip(subs, samples, strict=True):
        smp["advantages"] = smp["loss_mask"].float() * adv_of.get(s.trajectory_id, 0.0)
    return {"adv/abs_mean": float(adv.abs().mean()) if len(ids) else 0.0}


def gradient_share_metrics(subs: list[SubTrace], cfg: AlgorithmConfig) -> dict[str, float]:
    """How the loss weight spreads over sub-traces under ``cfg.loss_reduction``: the largest
    share of one sub-trace, and the share of the longest over that of the shortest."""
    if not subs:
        return {}
    n = torch.tensor([s.num_response_tokens for s in subs])
    shares = gradient_shares(n, cfg.loss_reduction, cfg.loss_constant)
    longest, shortest = int(n.argmax()), int(n.argmin())
    return {
        "loss/max_subtrace_share": float(shares.max()),
        "loss/longest_over_shortest_share": float(shares[longest] / shares[shortest]) if shares[shortest] > 0 else 0.0,
    }
