"""GAE across compaction cuts equals GAE over the uncut trajectory when the summary is the
identity (the first state after a cut has the value the uncut trajectory had there): in
``chained_gae`` and through the whole of ``gae_advantages`` (decoupled and length-adaptive
lambdas, truncation). Also: batched vs reference chaining, hand-worked cuts with observation
tokens, truncated last segments, value pretraining on compacted segments, ``flatten``."""

from __future__ import annotations

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.critic.gae import gae, gae_reference
from relayrl.rl.batching import (
    base_samples,
    chained_gae,
    chained_gae_reference,
    flatten,
    gae_advantages,
    pad,
    rewards_tensor,
)
from relayrl.rl.ppo import make_value_loss_fn
from relayrl.types import SubTrace, Trajectory


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


# --- chained_gae against its reference ---------------------------------------------------------

def _random_batch(gen: torch.Generator, n_traj: int):
    """Trajectories of 1-4 sub-traces, each a prompt (loss_mask 0) then actions and observation
    runs; rows shuffled so that segments of a trajectory are not adjacent."""
    rows = []
    for k in range(n_traj):
        n_seg = int(torch.randint(1, 5, (1,), generator=gen))
        for seg in range(n_seg):
            t = int(torch.randint(3, 30, (1,), generator=gen))
            m = (torch.rand(t, generator=gen) < 0.6).long()
            m[:2] = 0
            m[2] = 1  # at least one action
            rows.append((SubTrace(tokens=[0] * t, loss_mask=m.tolist(), rollout_logprobs=[0.0] * t, reward=0.0,
                                  trajectory_id=f"t{k}", segment=seg, num_segments=n_seg), m))
    perm = torch.randperm(len(rows), generator=gen).tolist()
    rows = [rows[i] for i in perm]
    subs = [s for s, _ in rows]
    masks = pad([m for _, m in rows])
    b, t = masks.shape
    # Garbage off the actions: chained_gae must not read it.
    on = masks.bool()
    values = torch.where(on, torch.randn(b, t, generator=gen, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64))
    rewards = torch.where(on, torch.randn(b, t, generator=gen, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64))
    lam_of = {s.trajectory_id: float(torch.rand(1, generator=gen)) for s in subs}
    lam = torch.tensor([lam_of[s.trajectory_id] for s in subs], dtype=torch.float64)
    last_boot = torch.randn(b, generator=gen, dtype=torch.float64)
    return subs, rewards, values, masks, lam, last_boot


@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_chained_gae_equals_reference_on_a_shuffled_batch(gamma):
    gen = torch.Generator().manual_seed(11)
    subs, rewards, values, masks, lam, last_boot = _random_batch(gen, 7)
    assert max(s.num_segments for s in subs) > 2  # the batch has chains of depth 3 or more
    for lam_, boot in ((lam, last_boot), (0.95, None), (1.0, last_boot), (0.0, None)):
        fast = chained_gae(subs, rewards, values, masks, gamma, lam_, boot)
        ref = chained_gae_reference(subs, rewards, values, masks, gamma, lam_, boot)
        torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=1e-10)
        assert torch.equal(fast[0] * (1 - masks), torch.zeros_like(fast[0]))


def test_last_bootstrap_is_read_only_on_last_segments():
    gen = torch.Generator().manual_seed(5)
    subs, rewards, values, masks, lam, last_boot = _random_batch(gen, 4)
    only_last = torch.tensor([float(s.segment == s.num_segments - 1) for s in subs], dtype=torch.float64)
    a, _ = chained_gae(subs, rewards, values, masks, 0.99, lam, last_boot)
    b, _ = chained_gae(subs, rewards, values, masks, 0.99, lam, last_boot * only_last)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_segment_is_an_error_not_a_fresh_start():
    m = [0, 1]
    subs = [SubTrace(tokens=[0, 0], loss_mask=m, rollout_logprobs=[0.0, 0.0], reward=0.0, trajectory_id="t",
                     segment=seg, num_segments=3) for seg in (0, 2)]
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"segments \[1\] of 3"):
        chained_gae(subs, x, x, torch.tensor([m, m]), 1.0, 1.0)


# --- hand-worked: two sub-traces through gae_advantages ----------------------------------------
#
# Segment 0: pos 0 prompt, 1 a, 2 a, 3 obs, 4 a          loss_mask [0, 1, 1, 0, 1]
# Segment 1: pos 0 prompt, 1 summary, 2 a, 3 obs, 4 a    loss_mask [0, 0, 1, 0, 1]   (reward 1)
# raw[i] = V(tokens[:i+1]); action i is sampled in the state valued raw[i-1]:
#   segment 0: V(a1) = raw0[0] = 0.5, V(a2) = raw0[1] = 0.25, V(a4) = raw0[3] = 0.5
#   segment 1: V(a2) = raw1[1] = 0.75 (system + task + summary), V(a4) = raw1[3] = 0.5
# raw0[2] follows an action and precedes an observation: no action is sampled there, never read.
# raw0[4] is the state at the cut; the recursion uses the next segment's first state instead.
# raw1[4] = 2.0 is the value after the last token: read only to bootstrap a truncated episode.
# The five steps in order: V = 0.5, 0.25, 0.5 | 0.75, 0.5; reward 1 on the last.
RAW0 = torch.tensor([0.5, 0.25, 9.0, 0.5, 7.0])
RAW1 = torch.tensor([3.0, 0.75, 5.0, 0.5, 2.0])


def _two_segments(terminal: bool = True):
    s0 = SubTrace(tokens=[1, 2, 3, 4, 5], loss_mask=[0, 1, 1, 0, 1], rollout_logprobs=[0.0] * 5, reward=0.0,
                  trajectory_id="t", segment=0, num_segments=2, terminal=False)
    s1 = SubTrace(tokens=[1, 6, 7, 8, 9], loss_mask=[0, 0, 1, 0, 1], rollout_logprobs=[0.0] * 5, reward=1.0,
                  trajectory_id="t", segment=1, num_segments=2, terminal=terminal)
    return [s0, s1]


def _advantages(subs, cfg):
    samples = base_samples(subs)
    metrics = gae_advantages(subs, samples, [RAW0.clone(), RAW1.clone()], cfg)
    return samples, metrics


def test_hand_worked_two_segments_lambda_half():
    cfg = AlgorithmConfig(gamma=0.9, lam_actor=0.5, lam_critic=0.5, normalize_advantages=False)
    samples, _ = _advantages(_two_segments(), cfg)
    # gamma * lam = 0.45. Backwards, the last segment first:
    # seg1 a4: delta = 1 + 0.9*0 - 0.5 = 0.5                       A = 0.5
    # seg1 a2: delta = 0 + 0.9*0.5 - 0.75 = -0.3                   A = -0.3 + 0.45*0.5 = -0.075
    # cut: seg0 a4 bootstraps from 0.75 and carries A = -0.075
    # seg0 a4: delta = 0 + 0.9*0.75 - 0.5 = 0.175                  A = 0.175 - 0.45*0.075 = 0.14125
    # seg0 a2: delta = 0 + 0.9*0.5 - 0.25 = 0.2   (obs skipped)    A = 0.2 + 0.45*0.14125 = 0.2635625
    # seg0 a1: delta = 0 + 0.9*0.25 - 0.5 = -0.275                 A = -0.275 + 0.45*0.2635625 = -0.156396875
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, -0.156396875, 0.2635625, 0.0, 0.14125]),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0.0, 0.0, -0.075, 0.0, 0.5]), rtol=0, atol=1e-7)
    # Critic targets R = A + V, one position left of each action (the state it was sampled in):
    # seg0: 0.343603125 @0, 0.5135625 @1, 0.64125 @3; seg1: 0.675 @1, 1.0 @3.
    torch.testing.assert_close(samples[0]["returns"], torch.tensor([0.343603125, 0.5135625, 0.0, 0.64125, 0.0]),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(samples[1]["returns"], torch.tensor([0.0, 0.675, 0.0, 1.0, 0.0]), rtol=0, atol=1e-7)
    # The old cut (bootstrap, no carried advantage) would give seg0 a4 only 0.175.


def test_truncated_last_segment_bootstraps_only_when_configured():
    base = dict(gamma=0.9, lam_actor=0.5, lam_critic=0.5, normalize_advantages=False)
    terminal_adv = torch.tensor([0.0, -0.156396875, 0.2635625, 0.0, 0.14125])  # the test above
    # Default (bootstrap_truncated False): a cap ends the episode like the task does.
    samples, _ = _advantages(_two_segments(terminal=False), AlgorithmConfig(**base))
    torch.testing.assert_close(samples[0]["advantages"], terminal_adv, rtol=0, atol=1e-7)
    # A terminal episode never bootstraps, whatever the option says.
    samples, _ = _advantages(_two_segments(terminal=True), AlgorithmConfig(**base, bootstrap_truncated=True))
    torch.testing.assert_close(samples[0]["advantages"], terminal_adv, rtol=0, atol=1e-7)
    # Truncated and bootstrapped from raw1[4] = 2.0:
    # seg1 a4: delta = 1 + 0.9*2.0 - 0.5 = 2.3                     A = 2.3
    # seg1 a2: A = -0.3 + 0.45*2.3 = 0.735
    # seg0 a4: A = 0.175 + 0.45*0.735 = 0.50575
    # seg0 a2: A = 0.2 + 0.45*0.50575 = 0.4275875
    # seg0 a1: A = -0.275 + 0.45*0.4275875 = -0.082585625
    samples, _ = _advantages(_two_segments(terminal=False), AlgorithmConfig(**base, bootstrap_truncated=True))
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0.0, 0.0, 0.735, 0.0, 2.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, -0.082585625, 0.4275875, 0.0, 0.50575]),
                               rtol=0, atol=1e-6)


def test_length_adaptive_lambda_uses_the_whole_trajectory():
    # l = 3 + 2 = 5 action tokens over both segments; alpha = 0.4: lam = 1 - 1/(0.4*5) = 0.5,
    # so the actor's advantages are those of the lam = 0.5 test (lam_actor = 0 is replaced).
    # Per-segment lengths would give 1 - 1/1.2 = 1/6 and max(0, 1 - 1/0.8) = 0 instead.
    cfg = AlgorithmConfig(gamma=0.9, lam_actor=0.0, lam_critic=1.0, lam_actor_adaptive_alpha=0.4,
                          normalize_advantages=False)
    samples, metrics = _advantages(_two_segments(), cfg)
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, -0.156396875, 0.2635625, 0.0, 0.14125]),
                               rtol=0, atol=1e-7)
    assert metrics["adv/lam_actor_mean"] == pytest.approx(0.5, abs=1e-12)
    # The critic keeps lam_critic = 1: returns are the discounted reward-to-go 0.9^(5-k):
    # 0.6561, 0.729, 0.81 | 0.9, 1.0
    torch.testing.assert_close(samples[0]["returns"], torch.tensor([0.6561, 0.729, 0.0, 0.81, 0.0]), rtol=0, atol=1e-7)
    torch.testing.assert_close(samples[1]["returns"], torch.tensor([0.0, 0.9, 0.0, 1.0, 0.0]), rtol=0, atol=1e-7)


def test_value_pretraining_trains_every_segment():
    # critic_warmup_steps only skips the actor; the critic's targets must exist on the compacted
    # segment too (its states start from system + task + summary). lam_critic = 1, gamma = 0.9.
    cfg = AlgorithmConfig(gamma=0.9, lam_actor=0.5, lam_critic=1.0, critic_warmup_steps=3, value_clip=None,
                          normalize_advantages=False)
    samples, _ = _advantages(_two_segments(), cfg)
    assert samples[0]["value_mask"].tolist() == [1, 1, 0, 1, 0]
    assert samples[1]["value_mask"].tolist() == [0, 1, 0, 1, 0]
    mb = {k: torch.stack([s[k] for s in samples]) for k in ("value_mask", "returns", "old_values")}
    critic_out = torch.stack([RAW0, RAW1]).to(torch.float64).requires_grad_(True)
    loss_fn = make_value_loss_fn(cfg, num_tokens=int(mb["value_mask"].sum()), num_sequences=2)
    loss, _ = loss_fn({"values": critic_out}, {k: v.to(torch.float64) if v.is_floating_point() else v
                                               for k, v in mb.items()})
    loss.backward()
    # token_mean over the 5 states: dL/dV = (V - R) / 5 at each trained state:
    # seg0: (0.5 - 0.6561)/5 @0, (0.25 - 0.729)/5 @1, (0.5 - 0.81)/5 @3
    # seg1: (0.75 - 0.9)/5 @1, (0.5 - 1.0)/5 @3
    expected = torch.tensor([[-0.1561 / 5, -0.479 / 5, 0.0, -0.31 / 5, 0.0],
                             [0.0, -0.15 / 5, 0.0, -0.5 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(critic_out.grad, expected, rtol=0, atol=1e-7)


# --- the whole pipeline: uncut vs cut with an identity summary ---------------------------------

def _pipeline_case(seed: int):
    """One uncut sub-trace (tokens, mask, raws) with observation runs and a final reward."""
    mask, _, _ = trajectory(24, seed)
    g = torch.Generator().manual_seed(100 + seed)
    raw = torch.rand(len(mask), generator=g)
    return mask, raw


def _cut_pipeline(mask, raw, at: list[int], terminal: bool, prefix: int = 4):
    """Cut after the action indices ``at``; each new sub-trace starts with ``prefix`` prompt
    tokens. Identity summary: its raws are the uncut raws from the token before the slice on,
    so every action (the first one included) sees the value it had in the uncut trajectory."""
    actions = torch.nonzero(mask)[:, 0].tolist()
    bounds = [0] + [actions[a] + 1 for a in at] + [len(mask)]
    subs, raws = [], []
    n = len(bounds) - 1
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        if i == 0:
            m, r = mask[lo:hi], raw[lo:hi]
        else:
            m = torch.cat([torch.zeros(prefix, dtype=mask.dtype), mask[lo:hi]])
            r = torch.cat([torch.full((prefix - 1,), 9.0), raw[lo - 1:hi]])
        subs.append(SubTrace(tokens=[0] * len(m), loss_mask=m.tolist(), rollout_logprobs=[0.0] * len(m),
                             reward=1.0 if i == n - 1 else 0.0, trajectory_id="t", segment=i, num_segments=n,
                             terminal=terminal if i == n - 1 else False))
        raws.append(r)
    return subs, raws


def _on(samples, key, mask_key):
    return torch.cat([s[key][s[mask_key].bool()] for s in samples])


PIPELINE_CFGS = [
    dict(gamma=g, lam_actor=lam, lam_critic=lam) for g in (1.0, 0.99) for lam in (0.95, 1.0)
] + [
    dict(gamma=0.99, lam_actor=0.9, lam_critic=1.0, bootstrap_truncated=True, normalize_advantages=True),
    dict(gamma=1.0, lam_actor=0.95, lam_critic=1.0, lam_actor_adaptive_alpha=0.1),
]


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("cfg_kw", PIPELINE_CFGS)
@pytest.mark.parametrize("at", [[7], [2, 15], [0, 9, 22]])
def test_gae_advantages_cut_equals_uncut(cfg_kw, at, terminal):
    cfg = AlgorithmConfig(**{"normalize_advantages": False, **cfg_kw})
    mask, raw = _pipeline_case(seed=len(at))
    whole = SubTrace(tokens=[0] * len(mask), loss_mask=mask.tolist(), rollout_logprobs=[0.0] * len(mask),
                     reward=1.0, trajectory_id="t", terminal=terminal)
    uncut = base_samples([whole])
    gae_advantages([whole], uncut, [raw.clone()], cfg)
    subs, raws = _cut_pipeline(mask, raw, at, terminal)
    cut_samples = base_samples(subs)
    gae_advantages(subs, cut_samples, raws, cfg)
    for key, mask_key in (("advantages", "loss_mask"), ("returns", "value_mask"), ("old_values", "value_mask")):
        torch.testing.assert_close(_on(cut_samples, key, mask_key), _on(uncut, key, mask_key), rtol=0, atol=1e-6)


# --- flatten: an empty last sub-trace hands its reward on --------------------------------------

def test_flatten_moves_the_reward_of_an_empty_last_sub_trace():
    def st(mask, seg, reward, terminal=False):
        return SubTrace(tokens=[0] * len(mask), loss_mask=mask, rollout_logprobs=[0.0] * len(mask), reward=reward,
                        trajectory_id="t", segment=seg, num_segments=3, terminal=terminal)
    # Compaction on the last allowed turn, then the turn cap: segment 2 is a prompt only.
    t = Trajectory("t", [st([0, 1, 1], 0, 0.0), st([0, 0, 1], 1, 0.0), st([0, 0, 0], 2, 0.75)], reward=0.75)
    ok = Trajectory("u", [SubTrace(tokens=[0, 0], loss_mask=[0, 1], rollout_logprobs=[0.0, 0.0], reward=1.0,
                                   trajectory_id="u")], reward=1.0)
    subs = flatten([[t, ok]])
    assert [(s.trajectory_id, s.segment, s.num_segments, s.reward, s.terminal) for s in subs] == [
        ("t", 0, 2, 0.0, False), ("t", 1, 2, 0.75, False), ("u", 0, 1, 1.0, True)]
    assert subs[2] is ok.sub_traces[0]  # trajectories with nothing dropped pass through as they are
    masks = pad([torch.tensor(s.loss_mask) for s in subs])
    assert rewards_tensor(subs, masks)[1].tolist() == [0.0, 0.0, 0.75]
