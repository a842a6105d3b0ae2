"""Alignment of values, rewards and critic targets in rl/batching (hand-worked)."""

from __future__ import annotations

import math

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.rl.batching import base_samples, gae_advantages, gradient_share_metrics, grpo_advantages
from relayrl.types import SubTrace

CFG = AlgorithmConfig(gamma=1.0, lam_actor=1.0, lam_critic=1.0, normalize_advantages=False)


def sub(tokens, mask, reward, tid="a", segment=0, num_segments=1, group="g"):
    return SubTrace(tokens=tokens, loss_mask=mask, rollout_logprobs=[0.0] * len(tokens), reward=reward,
                    trajectory_id=tid, segment=segment, num_segments=num_segments, group_id=group)


def test_one_sub_trace_two_turns():
    # tokens: prompt p, actions a1 a2, observation o, action a3; raw[i] = V(tokens[:i+1]).
    s = sub([5, 6, 7, 8, 9], [0, 1, 1, 0, 1], reward=1.0)
    samples = base_samples([s])
    raw = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    gae_advantages([s], samples, [raw], CFG)
    # Action a_i was sampled in the state after token i-1: a1 <- raw[0], a2 <- raw[1], a3 <- raw[3].
    # gamma = lam = 1 and the only reward is 1 on a3, so every advantage is 1 - V(state):
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, 0.9, 0.8, 0.0, 0.6]))
    # The critic learns at the state positions 0, 1, 3 with return 1 there.
    assert samples[0]["value_mask"].tolist() == [1, 1, 0, 1, 0]
    torch.testing.assert_close(samples[0]["returns"], torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(samples[0]["old_values"], torch.tensor([0.1, 0.2, 0.0, 0.4, 0.0]))


def test_segment_bootstraps_from_the_next_segments_first_action_state():
    s0 = sub([1, 2], [0, 1], reward=0.0, segment=0, num_segments=2)
    s1 = sub([3, 4, 5], [0, 0, 1], reward=1.0, segment=1, num_segments=2)
    samples = base_samples([s0, s1])
    raws = [torch.tensor([0.25, 0.5]), torch.tensor([0.0, 0.75, 0.9])]
    gae_advantages([s0, s1], samples, raws, CFG)
    # Segment 1's only action is sampled after token 1: V = 0.75; its advantage 1 - 0.75 = 0.25.
    # Segment 0's action (V = 0.25) has no reward, bootstraps from 0.75 and carries segment 1's
    # advantage on (gamma = lam = 1): delta = 0 + 0.75 - 0.25 = 0.5, A = 0.5 + 0.25 = 0.75,
    # which is 1 - 0.25, the advantage it would have in the uncut trajectory.
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, 0.75]))
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0.0, 0.0, 0.25]))
    # Critic target at segment 0's state: A + V = 1.0, the trajectory's return.
    torch.testing.assert_close(samples[0]["returns"], torch.tensor([1.0, 0.0]))


def test_segment_with_lambda_below_one_carries_the_next_advantage():
    cfg = AlgorithmConfig(gamma=1.0, lam_actor=0.5, lam_critic=0.5, normalize_advantages=False)
    s0 = sub([1, 2], [0, 1], reward=0.0, segment=0, num_segments=2)
    s1 = sub([3, 4, 5], [0, 0, 1], reward=1.0, segment=1, num_segments=2)
    samples = base_samples([s0, s1])
    raws = [torch.tensor([0.25, 0.5]), torch.tensor([0.0, 0.75, 0.9])]
    gae_advantages([s0, s1], samples, raws, cfg)
    # A1 = 1 - 0.75 = 0.25; A0 = (0 + 0.75 - 0.25) + 1 * 0.5 * 0.25 = 0.625.
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, 0.625]))
    # A plain bootstrap at the cut (no carried advantage) would give 0.5: the cut would matter.


def test_grpo_broadcasts_group_relative_rewards_to_action_tokens():
    a = sub([1, 2, 3], [0, 1, 1], reward=1.0, tid="a")
    b = sub([1, 2], [0, 1], reward=0.0, tid="b")
    samples = base_samples([a, b])
    grpo_advantages([a, b], samples, AlgorithmConfig(grpo_normalize_std=False))
    # Group mean 0.5: advantages +0.5 and -0.5 on every action token.
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0.0, -0.5]))


def test_gradient_share_metrics_hand_worked():
    # Trajectory a is cut in two sub-traces of 1 and 3 action tokens; b has one of 4. N = 8.
    subs = [sub([0, 1], [0, 1], 0.0, tid="a", segment=0, num_segments=2),
            sub([0, 1, 1, 1], [0, 1, 1, 1], 1.0, tid="a", segment=1, num_segments=2),
            sub([0, 1, 1, 1, 1], [0, 1, 1, 1, 1], 0.0, tid="b")]
    m = gradient_share_metrics(subs, AlgorithmConfig(loss_reduction="token_mean"))
    # token_mean: every token weighs 1/8, so the shares are 1/8, 3/8, 4/8.
    assert m["loss/max_subtrace_share"] == pytest.approx(0.5, abs=1e-12)
    assert m["loss/longest_over_shortest_share"] == pytest.approx(4.0, abs=1e-12)  # (4/8) / (1/8)
    entropy = -(1 / 8 * math.log(1 / 8) + 3 / 8 * math.log(3 / 8) + 1 / 2 * math.log(1 / 2))  # 0.97431...
    assert m["loss/effective_subtrace_frac"] == pytest.approx(math.exp(entropy) / 3, abs=1e-12)  # 0.88312...
    assert m["loss/share_before_cuts"] == pytest.approx(1 / 8, abs=1e-12)  # a's first sub-trace
    assert m["loss/total_weight"] == pytest.approx(1.0, abs=1e-12)
    # constant (C = 16): the same shares, but the weights sum to N / C = 0.5.
    m = gradient_share_metrics(subs, AlgorithmConfig(loss_reduction="constant", loss_constant=16.0))
    assert m["loss/max_subtrace_share"] == pytest.approx(0.5, abs=1e-12)
    assert m["loss/total_weight"] == pytest.approx(0.5, abs=1e-12)
    # seq_mean_token_mean: each sub-trace weighs 1/3 whatever its length.
    m = gradient_share_metrics(subs, AlgorithmConfig(loss_reduction="seq_mean_token_mean"))
    assert m == pytest.approx({"loss/max_subtrace_share": 1 / 3, "loss/longest_over_shortest_share": 1.0,
                               "loss/effective_subtrace_frac": 1.0, "loss/share_before_cuts": 1 / 3,
                               "loss/total_weight": 1.0}, abs=1e-12)
    # seq_mean_token_sum (B = 3 sub-traces): token_mean's shares, the weights sum to N / B = 8/3.
    m = gradient_share_metrics(subs, AlgorithmConfig(loss_reduction="seq_mean_token_sum"))
    assert m["loss/max_subtrace_share"] == pytest.approx(0.5, abs=1e-12)
    assert m["loss/total_weight"] == pytest.approx(8 / 3, abs=1e-12)
    assert gradient_share_metrics([], AlgorithmConfig()) == {}
