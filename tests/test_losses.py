"""PPO loss terms and reductions, with hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from relayrl.rl.losses import kl_penalty, policy_loss, reduce_loss, reduction_normaliser, value_loss

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-12)
LN2 = math.log(2.0)


def _policy_case(ratios, advs, mask=None):
    logprobs = torch.tensor([ratios], dtype=F64).log().requires_grad_(True)
    old = torch.zeros_like(logprobs)
    adv = torch.tensor([advs], dtype=F64)
    mask = torch.ones_like(adv, dtype=torch.long) if mask is None else torch.tensor([mask])
    return logprobs, old, adv, mask


def test_clip_higher_is_asymmetric():
    # eps_low = 0.2, eps_high = 0.28: rho is clipped to [0.8, 1.28].
    ratios = [1.5, 1.25, 0.7, 0.85, 1.5, 0.5]
    advs = [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    logprobs, old, adv, mask = _policy_case(ratios, advs)
    loss, m = policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # 1: A=+1, rho=1.5:  max(-1.5, -1.28) = -1.28           (clipped high)
    # 2: A=+1, rho=1.25: max(-1.25, -1.25) = -1.25          (inside [0.8, 1.28]; a symmetric 0.2 would clip it)
    # 3: A=-1, rho=0.7:  max(0.7, 0.8) = 0.8                (clipped low)
    # 4: A=-1, rho=0.85: max(0.85, 0.85) = 0.85
    # 5: A=-1, rho=1.5:  max(1.5, 1.28) = 1.5               (pessimistic: no clip)
    # 6: A=+1, rho=0.5:  max(-0.5, -0.8) = -0.5             (pessimistic: no clip)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -1.25, 0.8, 0.85, 1.5, -0.5]], dtype=F64), **TOL)
    assert m["clipped_high"].tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert m["clipped_low"].tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    # d loss / d logp = -A * rho where unclipped, 0 where the clip is active:
    # 0, -1.25, 0, 0.85, 1.5, -0.5
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.25, 0.0, 0.85, 1.5, -0.5]], dtype=F64), **TOL)


def test_dual_clip_bounds_negative_advantages_only():
    ratios = [5.0, 2.0, 5.0, 4.0]
    advs = [-1.0, -1.0, 1.0, -2.0]
    logprobs, old, adv, mask = _policy_case(ratios, advs)
    loss, m = policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # 1: A=-1, rho=5: PPO gives max(5, 1.28) = 5 > c*|A| = 3  -> 3 (dual-clipped)
    # 2: A=-1, rho=2: PPO gives max(2, 1.28) = 2 <= 3          -> 2
    # 3: A=+1, rho=5: PPO gives max(-5, -1.28) = -1.28; the dual clip never touches A > 0
    # 4: A=-2, rho=4: PPO gives max(8, 2.56) = 8 > 3*2 = 6     -> 6 (dual-clipped)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.28, 6.0]], dtype=F64), **TOL)
    assert m["dual_clipped"].tolist() == [[1.0, 0.0, 0.0, 1.0]]
    # Gradient: 0 on the constant bounds, -A * rho = 2 on token 2, 0 on the clipped token 3.
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 0.0, 0.0]], dtype=F64), **TOL)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logprobs, old, adv, mask, 0.2, 0.28, dual_clip=1.0)


def test_masked_tokens_are_zero_even_with_garbage():
    # Token 2 is masked and its log-ratio is 1000 (exp overflows to inf): loss 0, no NaN, no grad.
    logprobs = torch.tensor([[math.log(1.1), 1000.0]], dtype=F64, requires_grad=True)
    old = torch.zeros_like(logprobs)
    adv = torch.tensor([[1.0, -3.0]], dtype=F64)
    loss, m = policy_loss(logprobs, old, adv, torch.tensor([[1, 0]]), 0.2, 0.28)
    # Token 1: A=+1, rho=1.1 -> -1.1
    torch.testing.assert_close(loss, torch.tensor([[-1.1, 0.0]], dtype=F64), **TOL)
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.1, 0.0]], dtype=F64), **TOL)
    assert m["ratio"][0, 1].item() == 0.0


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_a_huge_log_ratio_gives_a_finite_loss_and_gradient(dual_clip):
    # logp_old = -95 (the engine found the token unlikely), logp = -0.5, A = -1: the log-ratio
    # is 94.5 and exp(94.5) = 1.2e41 overflows float32. Unclamped, the loss is -A * rho = inf,
    # and its gradient inf; with the dual clip the loss is the bound c but the gradient NaN
    # (where's backward: 0 * inf). Clamped at 20: rho = exp(20) = 485165195.4097903.
    logp = torch.tensor([[-0.5]], requires_grad=True)  # float32, as the backends compute it
    loss, m = policy_loss(logp, torch.tensor([[-95.0]]), torch.tensor([[-1.0]]), torch.tensor([[1]]),
                          0.2, 0.28, dual_clip=dual_clip)
    # Without dual clip: max(-A * rho, -A * clip(rho, 0.8, 1.28)) = max(exp(20), 1.28) = exp(20).
    # With c = 3: min(exp(20), -c * A = 3) = 3.
    expected = torch.exp(torch.tensor(20.0)) if dual_clip is None else torch.tensor(3.0)
    assert loss.item() == expected.item()
    assert m["ratio"].item() == torch.exp(torch.tensor(20.0)).item()
    assert m["approx_kl"].item() == 0.5 * 94.5**2  # the unclamped drift: 4465.125
    # The clamp is flat beyond 20, like a clipped token: gradient exactly 0, not inf or NaN.
    loss.sum().backward()
    assert logp.grad.tolist() == [[0.0]]


def _unclamped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip):
    """The surrogate exactly as ``policy_loss`` computed it before the log-ratio clamp (all
    tokens unmasked)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        bound = -dual_clip * advantages
        loss = torch.where((advantages < 0) & (loss > bound), bound, loss)
    return loss


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_the_clamp_changes_nothing_within_its_bound(dual_clip):
    # Log-ratios up to +-19.9 (and exactly +-20), both advantage signs: loss and gradient are
    # bit-for-bit the unclamped formula's.
    gen = torch.Generator().manual_seed(0)
    old = -10 * torch.rand(2, 64, generator=gen, dtype=F64)
    log_ratio = torch.cat([torch.empty(2, 62, dtype=F64).uniform_(-19.9, 19.9, generator=gen),
                           torch.tensor([[20.0, -20.0], [-20.0, 20.0]], dtype=F64)], dim=1)
    adv = torch.randn(2, 64, generator=gen, dtype=F64)
    a = (old + log_ratio).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(a, old, adv, torch.ones(2, 64, dtype=torch.long), 0.2, 0.28, dual_clip)
    reference = _unclamped_policy_loss(b, old, adv, 0.2, 0.28, dual_clip)
    assert torch.equal(loss, reference)
    loss.sum().backward()
    reference.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_value_clipping():
    values = torch.tensor([[1.0, 0.6, 0.0, 1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=F64)
    returns = torch.tensor([[1.2, 1.0, 1.0, 1.2]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, value_clip=0.2)
    # 1: V=1.0 moved 0.5 from V_old; clipped V = 0.7: max((1-1.2)^2, (0.7-1.2)^2) = max(0.04, 0.25)
    #    -> 0.5 * 0.25 = 0.125 (clipped term taken, no gradient)
    # 2: V=0.6 within 0.2 of 0.5: both terms (0.6-1)^2 = 0.16 -> 0.08
    # 3: V=0.0, clipped V = 0.3: max(1.0, 0.49) = 1.0 -> 0.5 (unclipped term: it still pulls V up)
    # 4: masked -> 0
    torch.testing.assert_close(loss, torch.tensor([[0.125, 0.08, 0.5, 0.0]], dtype=F64), **TOL)
    assert m["clipped"].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    loss.sum().backward()
    # d/dV 0.5*(V-R)^2 = V - R: token 1 -> 0 (clipped), 2 -> -0.4, 3 -> -1.0, 4 -> 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.4, -1.0, 0.0]], dtype=F64), **TOL)
    unclipped, _ = value_loss(values, old, returns, mask, value_clip=None)
    # 0.5 * (V-R)^2: 0.5*0.04 = 0.02, 0.08, 0.5
    torch.testing.assert_close(unclipped, torch.tensor([[0.02, 0.08, 0.5, 0.0]], dtype=F64), **TOL)


def test_kl_estimators():
    # Token 1: p = 0.5, p_ref = 0.25 -> log_r = log(0.25/0.5) = -ln2
    # Token 2: p = 0.25, p_ref = 0.5 -> log_r = +ln2
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=F64)
    # k1 = -log_r: ln2, -ln2
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[LN2, -LN2]], dtype=F64), **TOL)
    # k2 = 0.5 log_r^2 = 0.5 ln2^2 = 0.240226506959... for both
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5 * LN2**2] * 2], dtype=F64), **TOL)
    # k3 = (r - 1) - log_r: (0.5 - 1) + ln2 = 0.193147...; (2 - 1) - ln2 = 0.306852...
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[LN2 - 0.5, 1.0 - LN2]], dtype=F64), **TOL)
    # Padding holds 0 in both -> 0 for every estimator.
    zero = torch.zeros(1, 1, dtype=F64)
    for kind in ("k1", "k2", "k3"):
        assert kl_penalty(zero, zero, kind).item() == 0.0


def test_reductions_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 50.0, 50.0, 50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert reduce_loss(per_token, mask, "token_mean", 4.0).item() == 2.5
    # seq_mean_token_mean: (mean(1,2,3) + mean(4)) / 2 sequences = (2 + 4) / 2 = 3
    assert reduce_loss(per_token, mask, "seq_mean_token_mean", 2.0).item() == 3.0
    # seq_mean_token_sum: (sum(1,2,3) + sum(4)) / 2 sequences = (6 + 4) / 2 = 5
    assert reduce_loss(per_token, mask, "seq_mean_token_sum", 2.0).item() == 5.0
    # constant: 10 / 10 = 1
    assert reduce_loss(per_token, mask, "constant", 10.0).item() == 1.0
    assert reduction_normaliser("token_mean", 4, 2, 10.0) == 4.0
    assert reduction_normaliser("seq_mean_token_mean", 4, 2, 10.0) == 2.0
    assert reduction_normaliser("seq_mean_token_sum", 4, 2, 10.0) == 2.0
    assert reduction_normaliser("constant", 4, 2, 10.0) == 10.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
def test_reductions_sum_over_micro_batches(mode):
    # 8 sequences of different lengths; micro-batches are padded only to their own longest.
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    seqs = [torch.randn(n, generator=gen, dtype=F64) for n in lengths]
    masks = [(torch.rand(n, generator=gen) < 0.7).long() for n in lengths]
    masks[1][:] = 0  # a sequence without action tokens

    def pad(rows, width):
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])

    num_tokens = int(sum(m.sum() for m in masks))
    norm = reduction_normaliser(mode, num_tokens, len(seqs), 64.0)
    whole = reduce_loss(pad(seqs, 9), pad(masks, 9), mode, norm)
    for split in ([8], [1] * 8, [3, 5], [2, 2, 4]):
        total, start = torch.zeros((), dtype=F64), 0
        for size in split:
            rows = slice(start, start + size)
            width = max(lengths[rows])
            total = total + reduce_loss(pad(seqs[rows], width), pad(masks[rows], width), mode, norm)
            start += size
        torch.testing.assert_close(total, whole, rtol=0, atol=1e-12)
    # And the value is the definition, computed directly:
    if mode == "seq_mean_token_mean":
        direct = sum((s * m).sum() / max(int(m.sum()), 1) for s, m in zip(seqs, masks, strict=True)) / len(seqs)
    elif mode == "seq_mean_token_sum":
        direct = sum((s * m).sum() for s, m in zip(seqs, masks, strict=True)) / len(seqs)
    else:
        direct = sum((s * m).sum() for s, m in zip(seqs, masks, strict=True)) / norm
    torch.testing.assert_close(whole, torch.as_tensor(direct, dtype=F64), rtol=0, atol=1e-12)


def test_gradient_shares_hand_worked():
    from relayrl.rl.losses import gradient_shares

    n = torch.tensor([1, 3, 4])
    # token_mean / constant: every token weighs the same -> 1/8, 3/8, 4/8.
    torch.testing.assert_close(gradient_shares(n, "token_mean", 1.0), torch.tensor([0.125, 0.375, 0.5], dtype=torch.float64))
    torch.testing.assert_close(gradient_shares(n, "constant", 1024.0), torch.tensor([0.125, 0.375, 0.5], dtype=torch.float64))
    torch.testing.assert_close(gradient_shares(n, "seq_mean_token_sum", 1.0),
                               torch.tensor([0.125, 0.375, 0.5], dtype=torch.float64))
    # seq_mean_token_mean: every sequence weighs the same -> 1/3 each; an empty one gets none.
    torch.testing.assert_close(gradient_shares(torch.tensor([2, 0, 6]), "seq_mean_token_mean", 1.0),
                               torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    assert gradient_shares(torch.tensor([0, 0]), "token_mean", 1.0).tolist() == [0.0, 0.0]
