"""GAE over action tokens: hand-worked values, reference vs fast, chaining of segments."""

from __future__ import annotations

import math

import pytest
import torch

from relayrl.critic.gae import (
    first_action_value,
    gae,
    gae_actor_critic,
    gae_reference,
    length_adaptive_lambda,
)

BOTH = pytest.mark.parametrize("fn", [gae_reference, gae], ids=["reference", "fast"])
F64 = torch.float64
TOL = dict(rtol=0, atol=1e-12)

# One sequence, two turns with a tool observation between them:
#   pos:       0       1    2    3    4    5    6
#   kind:    prompt    a    a   obs  obs   a   pad
# Action values V1=0.5, V2=0.25, V5=0.75. The reward 1 sits on the last action token.
# Garbage (9.0, 100.0, inf, NaN) at non-action positions must be ignored.
MASK = torch.tensor([[0, 1, 1, 0, 0, 1, 0]])
VALUES = torch.tensor([[9.0, 0.5, 0.25, math.inf, 9.0, 0.75, 9.0]], dtype=F64)
REWARDS = torch.tensor([[math.nan, 0.0, 0.0, 100.0, 100.0, 1.0, 100.0]], dtype=F64)


@BOTH
def test_two_turns_with_observation_terminal(fn):
    adv, ret = fn(REWARDS, VALUES, MASK, torch.zeros(1, dtype=F64), 0.9, 0.5)
    # gamma=0.9, lam=0.5, gamma*lam=0.45; the observation tokens are not steps.
    # pos5: delta = 1 + 0.9*0 - 0.75 = 0.25                          A5 = 0.25
    # pos2: delta = 0 + 0.9*V5 - V2 = 0.675 - 0.25 = 0.425           A2 = 0.425 + 0.45*0.25 = 0.5375
    # pos1: delta = 0 + 0.9*V2 - V1 = 0.225 - 0.5 = -0.275           A1 = -0.275 + 0.45*0.5375 = -0.033125
    # (Counting the two observation tokens as steps would discount V5 by 0.9^3 instead.)
    expected = torch.tensor([[0.0, -0.033125, 0.5375, 0.0, 0.0, 0.25, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, **TOL)
    # returns = A + V on action tokens: 0.466875, 0.7875, 1.0
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.466875, 0.7875, 0.0, 0.0, 1.0, 0.0]], dtype=F64), **TOL)


@BOTH
def test_two_turns_truncated_bootstraps(fn):
    adv, _ = fn(REWARDS, VALUES, MASK, torch.tensor([2.0], dtype=F64), 0.9, 0.5)
    # Same sequence cut by a cap: the state after it is worth 2.0.
    # pos5: delta = 1 + 0.9*2.0 - 0.75 = 2.05                        A5 = 2.05
    # pos2: delta = 0.425                                            A2 = 0.425 + 0.45*2.05 = 1.3475
    # pos1: delta = -0.275                                           A1 = -0.275 + 0.45*1.3475 = 0.331375
    expected = torch.tensor([[0.0, 0.331375, 1.3475, 0.0, 0.0, 2.05, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, **TOL)


@BOTH
def test_per_row_lambda_and_empty_row(fn):
    # Row 0: the example above with lam = 0 (one-step TD: A = delta).
    # Row 1: no action token at all -> all zeros.
    rewards = torch.cat([REWARDS, REWARDS])
    values = torch.cat([VALUES, VALUES])
    mask = torch.cat([MASK, torch.zeros_like(MASK)])
    adv, ret = fn(rewards, values, mask, None, 0.9, torch.tensor([0.0, 0.7], dtype=F64))
    # A5 = 0.25, A2 = 0.425, A1 = -0.275 (the deltas derived above)
    torch.testing.assert_close(adv[0], torch.tensor([0.0, -0.275, 0.425, 0.0, 0.0, 0.25, 0.0], dtype=F64), **TOL)
    assert torch.equal(adv[1], torch.zeros(7, dtype=F64))
    assert torch.equal(ret[1], torch.zeros(7, dtype=F64))


def test_decoupled_lambdas():
    adv, ret = gae_actor_critic(REWARDS, VALUES, MASK, None, 0.9, lam_actor=0.5, lam_critic=1.0)
    # Actor: the lam=0.5 advantages of the first test.
    torch.testing.assert_close(adv, torch.tensor([[0.0, -0.033125, 0.5375, 0.0, 0.0, 0.25, 0.0]], dtype=F64), **TOL)
    # Critic with lam=1: returns are the discounted reward-to-go, whatever the values:
    # pos5: 1.0, pos2: 0.9 * 1.0 = 0.9, pos1: 0.9^2 * 1.0 = 0.81
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.81, 0.9, 0.0, 0.0, 1.0, 0.0]], dtype=F64), **TOL)


def test_length_adaptive_lambda():
    lam = length_adaptive_lambda(torch.tensor([10, 20, 100, 1000]), alpha=0.05)
    # 1 - 1/(0.05*l): l=10 -> 1 - 2 = -1 -> clamped 0; l=20 -> 0; l=100 -> 0.8; l=1000 -> 0.98
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 0.8, 0.98]), rtol=0, atol=1e-7)


def _random_case(gen: torch.Generator, b: int, t: int, dtype=F64):
    rewards = torch.randn(b, t, generator=gen, dtype=dtype)
    values = torch.randn(b, t, generator=gen, dtype=dtype)
    mask = (torch.rand(b, t, generator=gen) < 0.6).long()
    mask[0] = 0  # a row with no action token
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = mask * (torch.arange(t)[None, :] < lengths[:, None])  # right padding
    bootstrap = torch.randn(b, generator=gen, dtype=dtype)
    return rewards, values, mask, bootstrap


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fast_equals_reference_random(chunk):
    gen = torch.Generator().manual_seed(chunk)
    for t in (1, 7, 150):
        rewards, values, mask, bootstrap = _random_case(gen, 6, t)
        lam = torch.rand(6, generator=gen, dtype=F64)
        carry = torch.randn(6, generator=gen, dtype=F64)
        for gamma, lam_ in ((1.0, 1.0), (0.99, 0.95), (0.9, lam), (0.5, 0.0)):
            ref = gae_reference(rewards, values, mask, bootstrap, gamma, lam_, carry)
            fast = gae(rewards, values, mask, bootstrap, gamma, lam_, carry, chunk=chunk)
            torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=1e-10)
            assert torch.equal(fast[0] * (1 - mask), torch.zeros_like(fast[0]))


def test_fast_equals_reference_float32():
    gen = torch.Generator().manual_seed(7)
    rewards, values, mask, bootstrap = _random_case(gen, 4, 300, dtype=torch.float32)
    ref = gae_reference(rewards, values, mask, bootstrap, 1.0, 0.95)
    fast = gae(rewards, values, mask, bootstrap, 1.0, 0.95)
    assert fast[0].dtype == torch.float32
    # The reference also accumulates in Python floats (double) and rounds once on store.
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-6)


@BOTH
def test_split_with_bootstrap_and_carry_equals_uncut(fn):
    # Cut the two-turn example after position 2: segment 1 = [prompt, a, a],
    # segment 2 = [obs, obs, a, pad]. Segment 2 is terminal and is computed first:
    #   A5 = 0.25 (as uncut); its first action state has V = 0.75.
    # Segment 1 bootstraps from V = 0.75 and carries A = 0.25:
    #   A2 = (0 + 0.9*0.75 - 0.25) + 0.45*0.25 = 0.5375, A1 = -0.275 + 0.45*0.5375 = -0.033125
    uncut, _ = fn(REWARDS, VALUES, MASK, None, 0.9, 0.5)
    r1, v1, m1 = REWARDS[:, :3], VALUES[:, :3], MASK[:, :3]
    r2, v2, m2 = REWARDS[:, 3:], VALUES[:, 3:], MASK[:, 3:]
    adv2, _ = fn(r2, v2, m2, None, 0.9, 0.5)
    boot = first_action_value(v2, m2)
    carry = first_action_value(adv2, m2)
    assert boot.tolist() == [0.75] and carry.tolist() == [0.25]
    adv1, _ = fn(r1, v1, m1, boot, 0.9, 0.5, carry)
    torch.testing.assert_close(torch.cat([adv1, adv2], dim=1), uncut, **TOL)
    # Without the carry the cut is a plain bootstrap: A2 = 0.425, which differs for lam > 0.
    adv1_nocarry, _ = fn(r1, v1, m1, boot, 0.9, 0.5)
    assert adv1_nocarry[0, 2].item() == pytest.approx(0.425, abs=1e-12)


def test_random_trajectory_in_segments_equals_uncut():
    # A trajectory cut into three sub-traces (with observation tokens anywhere, and a cut that
    # may fall inside an observation run); each segment bootstraps from the next one's first
    # action state and carries its first advantage (actor and critic lambdas separately).
    gen = torch.Generator().manual_seed(3)
    rewards, values, mask, _ = _random_case(gen, 2, 60)
    rewards, values, mask = rewards[1:], values[1:], mask[1:]
    mask[0, 10] = mask[0, 25] = mask[0, 59] = 1
    cuts = [0, 11, 26, 60]
    gamma, lam_a, lam_c = 0.97, 0.9, 1.0
    uncut_adv, uncut_ret = gae_actor_critic(rewards, values, mask, None, gamma, lam_a, lam_c)
    boot = carry_a = carry_c = None
    advs, rets = [], []
    for lo, hi in reversed(list(zip(cuts[:-1], cuts[1:]))):
        r, v, m = rewards[:, lo:hi], values[:, lo:hi], mask[:, lo:hi]
        adv, ret = gae_actor_critic(r, v, m, boot, gamma, lam_a, lam_c, carry_a, carry_c)
        advs.insert(0, adv)
        rets.insert(0, ret)
        boot = first_action_value(v, m)
        carry_a = first_action_value(adv, m)
        carry_c = first_action_value(ret - v, m)
    torch.testing.assert_close(torch.cat(advs, 1), uncut_adv, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(rets, 1), uncut_ret, rtol=0, atol=1e-10)


def test_lambda_one_gamma_one_is_monte_carlo():
    # gamma = lam = 1, terminal: A_k = (sum of rewards from step k on) - V_k.
    # Rewards on actions 1, 2, 5: 0.5, -1, 2 -> reward-to-go 1.5, 1.0, 2.0
    rewards = torch.tensor([[0.0, 0.5, -1.0, 0.0, 0.0, 2.0, 0.0]], dtype=F64)
    adv, ret = gae(rewards, VALUES, MASK, None, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.5, 1.0, 0.0, 0.0, 2.0, 0.0]], dtype=F64), **TOL)
    # A = return - V: 1.5 - 0.5 = 1.0, 1.0 - 0.25 = 0.75, 2.0 - 0.75 = 1.25
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0, 0.75, 0.0, 0.0, 1.25, 0.0]], dtype=F64), **TOL)
    assert not math.isnan(adv.sum().item())
