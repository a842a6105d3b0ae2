"""GAE across compaction cuts equals GAE over the uncut trajectory when the summary is the
identity (the first state after a cut has the value the uncut trajectory had there)."""

from __future__ import annotations

import pytest
import torch

from relayrl.critic.gae import gae, gae_reference
from relayrl.rl.batching import chained_gae, pad
from relayrl.types import SubTrace


def trajectory(n_actions: int, seed: int):
    """An uncut trajectory: a 3-token prompt, then turns of 2-4 actions separated by 2 observation
    tokens; random values, rewards of 0 except some intermediate shaping and a final reward."""
    g = torch.Generator().manual_seed(seed)
    mask = [0, 0, 0]
    left = n_actions
    while left > 0:
        k = min(left, int(torch.randint(2, 5, (1,), generator=g)))
        mask += [1] * k
        left -= k
        if left > 0:
            mask += [0, 0]
    mask_t = torch.tensor(mask)
    values = torch.rand(len(mask), generator=g) * mask_t
    rewards = torch.zeros(len(mask))
    actions = torch.nonzero(mask_t)[:, 0]
    rewards[actions[-1]] = 1.0
    rewards[actions[len(actions) // 2]] = -0.25  # a reward in the middle, so cuts are not trivial
    return mask_t, values, rewards


def cut(mask, values, rewards, at: list[int]):
    """Cut after the action indices in ``at``; each new segment starts with a 4-token prompt
    (start + summary, loss_mask 0) and the identity summary keeps values unchanged."""
    actions = torch.nonzero(mask)[:, 0].tolist()
    bounds = [0] + [actions[a] + 1 for a in at] + [len(mask)]
    segs = []
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        prefix = 0 if i == 0 else 4
        m = torch.cat([torch.zeros(prefix, dtype=mask.dtype), mask[lo:hi]])
        v = torch.cat([torch.zeros(prefix), values[lo:hi]])
        r = torch.cat([torch.zeros(prefix), rewards[lo:hi]])
        segs.append((m, v, r))
    subs = [SubTrace(tokens=[0] * len(m), loss_mask=m.tolist(), rollout_logprobs=[0.0] * len(m),
                     reward=0.0, trajectory_id="t", segment=i, num_segments=len(segs))
            for i, (m, _, _) in enumerate(segs)]
    return subs, segs


def on_actions(x, m):
    return x[m.bool()]


@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [0.95, 1.0, 0.5])
@pytest.mark.parametrize("cuts", [[5], [3, 11], [0, 1, 17]])
def test_cut_equals_uncut_with_identity_summary(gamma, lam, cuts):
    mask, values, rewards = trajectory(20, seed=len(cuts))
    full_adv, full_ret = gae_reference(rewards[None], values[None], mask[None], None, gamma, lam)
    subs, segs = cut(mask, values, rewards, cuts)
    masks = pad([m for m, _, _ in segs])
    adv, ret = chained_gae(subs, pad([r for _, _, r in segs]), pad([v for _, v, _ in segs]), masks, gamma, lam)
    got_adv = torch.cat([on_actions(adv[i, :len(m)], m) for i, (m, _, _) in enumerate(segs)])
    got_ret = torch.cat([on_actions(ret[i, :len(m)], m) for i, (m, _, _) in enumerate(segs)])
    torch.testing.assert_close(got_adv, on_actions(full_adv[0], mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_ret, on_actions(full_ret[0], mask), rtol=0, atol=1e-6)


def test_bootstrap_alone_is_not_enough_below_lambda_one():
    """Without the carried advantage a cut changes the advantages (here by more than 1e-3):
    the equivalence above depends on ``next_advantage``, and would catch its loss."""
    mask, values, rewards = trajectory(20, seed=7)
    full_adv, _ = gae_reference(rewards[None], values[None], mask[None], None, 1.0, 0.9)
    subs, segs = cut(mask, values, rewards, [9])
    (m0, v0, r0), (m1, v1, r1) = segs
    a1, _ = gae(r1[None], v1[None], m1[None], None, 1.0, 0.9)
    first_v1 = v1[m1.bool()][0]
    a0, _ = gae(r0[None], v0[None], m0[None], first_v1[None], 1.0, 0.9)  # no next_advantage
    got = torch.cat([on_actions(a0[0], m0), on_actions(a1[0], m1)])
    assert (got - on_actions(full_adv[0], mask)).abs().max() > 1e-3


def test_rows_of_other_trajectories_do_not_chain():
    """Two single-segment trajectories in one batch: each is its own recursion."""
    m = torch.tensor([0, 1, 1])
    v = torch.tensor([0.0, 0.5, 0.25])
    r = torch.tensor([0.0, 0.0, 1.0])
    subs = [SubTrace(tokens=[0] * 3, loss_mask=m.tolist(), rollout_logprobs=[0.0] * 3, reward=1.0,
                     trajectory_id=tid, segment=0, num_segments=1) for tid in ("a", "b")]
    adv, _ = chained_gae(subs, torch.stack([r, r]), torch.stack([v, v]), torch.stack([m, m]), 1.0, 1.0)
    # gamma = lam = 1: A = 1 - V at each action: [0, 0.5, 0.75] for both rows.
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.75]] * 2))
