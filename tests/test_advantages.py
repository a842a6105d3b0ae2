"""Group-relative advantages and masked statistics, with hand-worked numbers."""

from __future__ import annotations

import math

import torch

from relayrl.rl.advantages import (
    broadcast_to_tokens,
    group_relative_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-9)


def test_grpo_groups_in_any_order():
    # Group 7: rewards 1, 0, 1, 1 -> mean 0.75; deviations 0.25, -0.75, 0.25, 0.25;
    #   Bessel std = sqrt((3*0.0625 + 0.5625) / 3) = sqrt(0.25) = 0.5
    #   A = 0.25/0.5 = 0.5 for the 1s, -0.75/0.5 = -1.5 for the 0.
    # Group 3: rewards 0, 0 -> all equal -> 0 / (0 + eps) = 0.
    # Group 5: a single episode -> 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 5.0, 1.0], dtype=F64)
    groups = torch.tensor([7, 3, 7, 3, 7, 5, 7])
    adv = group_relative_advantages(rewards, groups, normalize_std=True, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.0, -1.5, 0.0, 0.5, 0.0, 0.5], dtype=F64), **TOL)
    # With eps = 1e-6 the 1s get 0.25 / 0.500001.
    adv_eps = group_relative_advantages(rewards, groups)
    assert abs(adv_eps[0].item() - 0.25 / 0.500001) < 1e-12


def test_dr_grpo_keeps_the_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 5.0, 1.0], dtype=F64)
    groups = torch.tensor([7, 3, 7, 3, 7, 5, 7])
    adv = group_relative_advantages(rewards, groups, normalize_std=False)
    # r - mean only: 0.25 and -0.75 in group 7; 0 elsewhere.
    torch.testing.assert_close(adv, torch.tensor([0.25, 0.0, -0.75, 0.0, 0.25, 0.0, 0.25], dtype=F64), **TOL)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, math.inf]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Counted: 1, 2, 3, 4 -> sum 10, mean 2.5; Bessel var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert masked_sum(torch.nan_to_num(x, posinf=0.0), mask).item() == 10.0
    assert masked_mean(torch.nan_to_num(x, posinf=0.0), mask, dim=1).tolist() == [2.0, 4.0]
    assert masked_var(torch.nan_to_num(x, posinf=0.0), mask).item() == 5.0 / 3.0
    # An empty mask gives 0, not NaN.
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    std = math.sqrt(5.0 / 3.0)  # 1.2909944...
    out = masked_whiten(x, mask, eps=0.0)
    # (x - 2.5) / std on counted entries, 0 elsewhere: -1.5/std, -0.5/std, 0.5/std, 1.5/std
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, expected, **TOL)
    # shift_mean=False only rescales: 1/std, 2/std, ...
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(out[0], torch.tensor([1 / std, 2 / std, 3 / std], dtype=F64), **TOL)


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([0.5, -1.0]), torch.tensor([[0, 1, 1], [1, 0, 0]]))
    assert out.tolist() == [[0.0, 0.5, 0.5], [-1.0, 0.0, 0.0]]
