"""From trajectories to training samples: alignment of values, rewards and advantages.

This is the one place where per-token quantities are lined up (see ``rl/backend.py``):

- ``logprobs[i]`` is log p(tokens[i] | tokens[:i]);
- the critic's raw output ``raw[i] = V(tokens[:i+1])``, so the value of the state in which
  action token i was sampled is ``raw[i-1]``, and the critic is trained at position i-1 with
  the return of action token i (``value_mask``/``returns``/``old_values`` are state-aligned);
- the task reward sits on the last action token of the last sub-trace of a trajectory.

Bootstrapping: the last sub-trace of a scored trajectory does not bootstrap (the episode is
over and its reward is final, even when a turn or context cap ended it). A sub-trace that is
followed by another sub-trace of the same trajectory bootstraps from the value of that
sub-trace's first action state, so GAE runs across the cut.
"""

from __future__ import annotations

import torch

from relayrl.config import AlgorithmConfig
from relayrl.critic.gae import first_action_value, gae
from relayrl.rl.advantages import group_relative_advantages, masked_whiten
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


def bootstraps(subs: list[SubTrace], values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(b,) bootstrap value per sub-trace: the next segment's first action-state value, else 0.

    values, masks: (b, t) action-aligned values and loss masks of all sub-traces."""
    first = first_action_value(values, masks)
    by_key = {(s.trajectory_id, s.segment): i for i, s in enumerate(subs)}
    out = torch.zeros(len(subs))
    for i, s in enumerate(subs):
        nxt = by_key.get((s.trajectory_id, s.segment + 1))
        if nxt is not None:
            out[i] = first[nxt]
    return out


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
    boot = bootstraps(subs, values, masks)
    # VC-PPO: the actor's advantages and the critic's targets use separate lambdas.
    adv, ret = gae(rewards, values, masks, boot, cfg.gamma, cfg.lam_actor)
    if cfg.lam_critic != cfg.lam_actor:
        _, ret = gae(rewards, values, masks, boot, cfg.gamma, cfg.lam_critic)
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
