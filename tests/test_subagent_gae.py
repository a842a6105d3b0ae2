"""Credit for sub-agent traces: a child's recursion continues at its parent's next action after
the answer returns (bootstrap + carried advantage). Hand-worked trees, the batched
``chained_gae`` against its path-splicing reference on random trees (nested children,
compaction cuts, children whose parent acts no more), parent-link checks, ``flatten`` with
dropped children, and the whole of ``gae_advantages`` on a trajectory with a child."""

from __future__ import annotations

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.critic.gae import gae_reference
from relayrl.rl.batching import base_samples, chained_gae, chained_gae_reference, flatten, gae_advantages, pad
from relayrl.types import SubTrace, Trajectory


def sub(mask, segment, n, parent=-1, position=-1, tid="t", reward=0.0):
    return SubTrace(tokens=[0] * len(mask), loss_mask=list(mask), rollout_logprobs=[0.0] * len(mask),
                    reward=reward, trajectory_id=tid, segment=segment, num_segments=n,
                    parent_segment=parent, parent_position=position,
                    kind="subagent" if parent >= 0 else "turns")


def test_child_bootstraps_from_the_parents_next_action_hand_worked():
    """Parent (segment 1): [prompt, a1, obs, obs, a2], V(a1)=0.5, V(a2)=0.8, reward 1 on a2.
    Child (segment 0) answers into the observation at position 2: [prompt, c1, c2],
    V(c1)=0.3, V(c2)=0.6. gamma=0.9, lam=0.5 (gamma*lam = 0.45).

    Parent: A(a2) = 1 - 0.8 = 0.2;  A(a1) = 0.9*0.8 - 0.5 + 0.45*0.2 = 0.22 + 0.09 = 0.31.
    Child continues at a2 (the parent's first action at or after position 2):
    A(c2) = 0.9*0.8 - 0.6 + 0.45*A(a2) = 0.12 + 0.09 = 0.21;
    A(c1) = 0.9*0.6 - 0.3 + 0.45*0.21 = 0.24 + 0.0945 = 0.3345.
    Returns = A + V: c1 0.6345, c2 0.81, a1 0.81, a2 1.0."""
    subs = [sub([0, 1, 1], 0, 2, parent=1, position=2), sub([0, 1, 0, 0, 1], 1, 2)]
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    values = pad([torch.tensor([0, 0.3, 0.6]), torch.tensor([0, 0.5, 0, 0, 0.8])])
    rewards = pad([torch.zeros(3), torch.tensor([0, 0, 0, 0, 1.0])])
    adv, ret = chained_gae(subs, rewards, values, masks, 0.9, 0.5)
    torch.testing.assert_close(adv[0, :3], torch.tensor([0, 0.3345, 0.21]), rtol=0, atol=1e-6)
    torch.testing.assert_close(adv[1], torch.tensor([0, 0.31, 0, 0, 0.2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret[0, :3], torch.tensor([0, 0.6345, 0.81]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret[1], torch.tensor([0, 0.81, 0, 0, 1.0]), rtol=0, atol=1e-6)
    # The parent's own numbers are those it has without any child: the child adds nothing to it.
    alone, _ = chained_gae([sub([0, 1, 0, 0, 1], 0, 1)], rewards[1:], values[1:], masks[1:], 0.9, 0.5)
    torch.testing.assert_close(adv[1], alone[0], rtol=0, atol=0)


def test_child_after_the_parents_last_action_passes_to_the_next_segment_hand_worked():
    """Main chain: segment 1 = [p, a1, obs] (compaction cut after it), segment 2 = [p, p, b1],
    V(a1)=0.2, V(b1)=0.7, reward 1 on b1. The child (segment 0, [p, c1], V(c1)=0.4) answers
    into segment 1 at position 2, after a1: segment 1 has no action left, so the child continues
    where segment 1 does, at b1. gamma = lam = 1: A(b1) = 1 - 0.7 = 0.3; A(a1) = 1 - 0.2 = 0.8;
    A(c1) = V(b1) - V(c1) + A(b1) = 0.7 - 0.4 + 0.3 = 0.6 (= 1 - 0.4)."""
    subs = [sub([0, 1], 0, 3, parent=1, position=2), sub([0, 1, 0], 1, 3), sub([0, 0, 1], 2, 3)]
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    values = pad([torch.tensor([0, 0.4]), torch.tensor([0, 0.2, 0]), torch.tensor([0, 0, 0.7])])
    rewards = pad([torch.zeros(2), torch.zeros(3), torch.tensor([0, 0, 1.0])])
    adv, _ = chained_gae(subs, rewards, values, masks, 1.0, 1.0)
    assert adv[0, 1].item() == pytest.approx(0.6, abs=1e-6)
    assert adv[1, 1].item() == pytest.approx(0.8, abs=1e-6)
    assert adv[2, 2].item() == pytest.approx(0.3, abs=1e-6)


def random_tree(g: torch.Generator, tid: str, n_main: int, n_children: int):
    """A trajectory: n_main main-chain segments and n_children children, each child of a random
    earlier-made trace (main or child: nesting), answering at a random position."""
    def mask(length):
        m = (torch.rand(length, generator=g) < 0.6).long()
        m[0] = 0
        m[1] = 1  # at least one action
        return m.tolist()

    main = [mask(int(torch.randint(3, 9, (1,), generator=g))) for _ in range(n_main)]
    kids: list[tuple[list[int], tuple[str, int], int]] = []
    for _ in range(n_children):
        pick = int(torch.randint(0, n_main + len(kids), (1,), generator=g))
        parent = ("main", pick) if pick < n_main else ("child", pick - n_main)
        plen = len(main[parent[1]]) if parent[0] == "main" else len(kids[parent[1]][0])
        kids.append((mask(int(torch.randint(2, 7, (1,), generator=g))), parent,
                     int(torch.randint(0, plen + 1, (1,), generator=g))))
    c = len(kids)
    n = c + n_main
    seg_of = lambda p: p[1] if p[0] == "child" else c + p[1]  # noqa: E731
    subs = [sub(m, i, n, parent=seg_of(p), position=pos, tid=tid) for i, (m, p, pos) in enumerate(kids)]
    subs += [sub(m, c + i, n, tid=tid) for i, m in enumerate(main)]
    return subs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_batched_equals_reference_on_random_trees(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    subs = []
    for k in range(3):
        subs += random_tree(g, f"t{k}", n_main=1 + (seed + k) % 3, n_children=(seed * 3 + k) % 5)
    perm = torch.randperm(len(subs), generator=g).tolist()
    subs = [subs[i] for i in perm]  # rows in any order
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    values = torch.rand(masks.shape, generator=g) * 2 - 1  # garbage off the actions too
    rewards = torch.randn(masks.shape, generator=g)
    boot = torch.rand(len(subs), generator=g)
    fast = chained_gae(subs, rewards, values, masks, gamma, lam, boot)
    ref = chained_gae_reference(subs, rewards, values, masks, gamma, lam, boot)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a * masks, b * masks, rtol=0, atol=1e-5)


def test_reference_splices_the_child_into_the_parent():
    """The reference's definition, checked by hand on one path: the child's actions, then the
    parent's actions from the return position on, through gae_reference."""
    subs = [sub([0, 1, 1], 0, 2, parent=1, position=3), sub([0, 1, 1, 0, 1, 1], 1, 2)]
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    values = torch.rand(masks.shape, generator=torch.Generator().manual_seed(1))
    rewards = torch.rand(masks.shape, generator=torch.Generator().manual_seed(2))
    adv, _ = chained_gae(subs, rewards, values, masks, 0.97, 0.9)
    path_r = torch.cat([rewards[0, 1:3], rewards[1, 4:6]])
    path_v = torch.cat([values[0, 1:3], values[1, 4:6]])
    want, _ = gae_reference(path_r[None], path_v[None], torch.ones(1, 4, dtype=torch.long), None, 0.97, 0.9)
    torch.testing.assert_close(adv[0, 1:3], want[0, :2].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [
    dict(parent=5, position=0),     # no such segment
    dict(parent=0, position=0),     # itself
    dict(parent=1, position=99),    # outside the parent's tokens
])
def test_bad_parent_links_are_errors(bad):
    subs = [sub([0, 1], 0, 2, **bad), sub([0, 1, 0, 1], 1, 2)]
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    with pytest.raises(ValueError):
        chained_gae(subs, torch.zeros(masks.shape), torch.zeros(masks.shape), masks, 1.0, 1.0)


def test_a_child_numbered_after_the_main_chain_is_an_error():
    subs = [sub([0, 1], 0, 2), sub([0, 1], 1, 2, parent=0, position=1)]
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    with pytest.raises(ValueError, match="numbered"):
        chained_gae(subs, torch.zeros(masks.shape), torch.zeros(masks.shape), masks, 1.0, 1.0)


def test_flatten_drops_untrained_children_with_their_children_and_renumbers():
    """Segments: 0 = an untrained child of 3 (no action), 1 = its child, 2 = a trained child of
    3, 3 = the main chain. Kept: old 2 -> 0 (parent 3 -> 1), old 3 -> 1 with the reward."""
    t = Trajectory("t", [sub([0, 0], 0, 4, parent=3, position=1), sub([0, 1], 1, 4, parent=0, position=1),
                         sub([0, 1], 2, 4, parent=3, position=1), sub([0, 1, 0, 1], 3, 4, reward=1.0)], 1.0)
    out = flatten([[t]])
    assert [(s.segment, s.num_segments, s.parent_segment, s.reward) for s in out] == [(0, 2, 1, 0.0), (1, 2, -1, 1.0)]


def test_gae_advantages_gives_the_child_the_parents_credit_and_critic_targets():
    """The whole of ``gae_advantages`` (no whitening): a child answering before the parent's
    last action, gamma = lam = 1, reward 1. Every action's advantage is 1 - V(its state), the
    child's included, and the child's states get critic targets of 1 (the return)."""
    child = sub([0, 1, 1], 0, 2, parent=1, position=2)
    parent = sub([0, 1, 0, 0, 1], 1, 2, reward=1.0)
    samples = base_samples([child, parent])
    raws = [torch.tensor([0.3, 0.6, 0.0]), torch.tensor([0.5, 0.0, 0.0, 0.8, 0.0])]  # raw[i] = V(tokens[:i+1])
    cfg = AlgorithmConfig(gamma=1.0, lam_actor=1.0, lam_critic=1.0, normalize_advantages=False)
    gae_advantages([child, parent], samples, raws, cfg)
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0, 0.7, 0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0, 0.5, 0, 0, 0.2]), rtol=0, atol=1e-6)
    assert samples[0]["value_mask"].tolist() == [1, 1, 0]
    torch.testing.assert_close(samples[0]["returns"], torch.tensor([1.0, 1.0, 0.0]), rtol=0, atol=1e-6)
