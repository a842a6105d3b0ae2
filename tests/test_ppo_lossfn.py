"""The LossFns the trainer backends call: hand-worked values, value alignment, and
micro-batch invariance (1 x N equals N x 1, losses, gradients and summed metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.rl.ppo import make_policy_loss_fn, make_value_loss_fn

F64 = torch.float64


def t(rows, **kw):
    return torch.tensor(rows, dtype=F64, **kw)


def test_policy_loss_fn_by_hand():
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="k1",
                          entropy_coef=0.01, loss_reduction="token_mean")
    fn = make_policy_loss_fn(cfg, num_tokens=3, num_sequences=2)
    # Micro-batch 1: one sequence, prompt token then two action tokens.
    lp1 = t([[0.0, math.log(1.5), math.log(1.1)]], requires_grad=True)
    ent1 = t([[9.0, 2.0, 1.0]], requires_grad=True)
    mb1 = {"loss_mask": torch.tensor([[0, 1, 1]]), "old_logprobs": t([[0.0, 0.0, 0.0]]),
           "advantages": t([[0.0, 1.0, -1.0]]), "ref_logprobs": t([[0.0, 0.0, 0.0]])}
    # Micro-batch 2: one sequence with one action token (then padding).
    lp2 = t([[0.0, math.log(0.5), 0.0]], requires_grad=True)
    ent2 = t([[9.0, 3.0, 9.0]], requires_grad=True)
    mb2 = {"loss_mask": torch.tensor([[0, 1, 0]]), "old_logprobs": t([[0.0, 0.0, 0.0]]),
           "advantages": t([[0.0, 2.0, 0.0]]), "ref_logprobs": t([[0.0, 0.0, 0.0]])}
    loss1, m1 = fn({"logprobs": lp1, "entropy": ent1}, mb1)
    loss2, m2 = fn({"logprobs": lp2, "entropy": ent2}, mb2)
    # PPO terms: A=+1, rho=1.5 -> -1.28 (clipped high); A=-1, rho=1.1 -> 1.1; A=+2, rho=0.5 -> -1.0
    # pg_loss contributions over the global 3 tokens: (-1.28 + 1.1)/3 = -0.06 and -1/3
    assert m1["pg_loss"] == pytest.approx(-0.06, abs=1e-12)
    assert m2["pg_loss"] == pytest.approx(-1 / 3, abs=1e-12)
    # k1 = logp - logp_ref: (ln 1.5 + ln 1.1)/3 = ln(1.65)/3 and ln(0.5)/3
    assert m1["kl"] == pytest.approx(math.log(1.65) / 3, abs=1e-12)
    assert m2["kl"] == pytest.approx(-math.log(2) / 3, abs=1e-12)
    # entropy: (2 + 1)/3 = 1 and 3/3 = 1
    assert m1["entropy"] == pytest.approx(1.0, abs=1e-12) and m2["entropy"] == pytest.approx(1.0, abs=1e-12)
    # loss = pg + 0.1 * kl - 0.01 * entropy, summed over micro-batches:
    # -0.06 - 1/3 + 0.1 * ln(1.65 / 2) / 3 - 0.02 = -0.4133333... - 0.0064127... = -0.4197461...
    total = loss1 + loss2
    assert total.item() == pytest.approx(-0.06 - 1 / 3 + 0.1 * math.log(0.825) / 3 - 0.02, abs=1e-12)
    assert m1["loss"] + m2["loss"] == pytest.approx(total.item(), abs=1e-12)
    # One token of three was clipped (the first of micro-batch 1).
    assert m1["clipfrac"] + m2["clipfrac"] == pytest.approx(1 / 3, abs=1e-12)
    assert m1["clipfrac_high"] == pytest.approx(1 / 3, abs=1e-12) and m1["clipfrac_low"] == 0.0
    total.backward()
    # d/d logp: clipped token -> only KL: 0.1/3; A=-1, rho=1.1 -> (1.1 + 0.1)/3 = 0.4;
    # A=+2, rho=0.5 -> (-2*0.5 + 0.1)/3 = -0.3. Entropy: -0.01/3 on each action token.
    torch.testing.assert_close(lp1.grad, t([[0.0, 0.1 / 3, 0.4]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(lp2.grad, t([[0.0, -0.3, 0.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent1.grad, t([[0.0, -0.01 / 3, -0.01 / 3]]), rtol=0, atol=1e-12)


def test_old_logprobs_from_the_forward_equal_a_recompute():
    """With old_from_forward the ratio is 1 (nothing clips) and the gradient is A / N on every
    action token, exactly as with recomputed old logprobs equal to the current ones."""
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28, loss_reduction="token_mean")
    lp = t([[0.0, math.log(0.3), math.log(0.9), math.log(0.6)]], requires_grad=True)
    mb = {"loss_mask": torch.tensor([[0, 1, 1, 1]]), "advantages": t([[0.0, 2.0, -1.0, 0.5]])}
    loss, m = make_policy_loss_fn(cfg, num_tokens=3, num_sequences=1, old_from_forward=True)({"logprobs": lp}, mb)
    # rho = 1 everywhere: L = -(2 - 1 + 0.5) / 3 = -0.5; dL/dlogp = -A / 3.
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-12) and m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, -2 / 3, 1 / 3, -0.5 / 3]]), rtol=0, atol=1e-12)
    lp2 = lp.detach().clone().requires_grad_()
    recomputed = dict(mb, old_logprobs=lp.detach().clone())
    loss2, m2 = make_policy_loss_fn(cfg, num_tokens=3, num_sequences=1)({"logprobs": lp2}, recomputed)
    loss2.backward()
    assert loss2.item() == loss.item() and m2 == m
    assert torch.equal(lp2.grad, lp.grad)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_engine_old_logprobs_far_below_the_trainers_stay_finite(dual_clip):
    """algorithm.old_logprobs=engine: a token the engine scored -95 that the trainer scores -0.5
    (log-ratio 94.5, exp overflows float32) must not make the loss, its gradient or the metrics
    inf or NaN. The log-ratio is clamped at 20 (rl.losses.LOG_RATIO_CLAMP)."""
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, loss_reduction="token_mean")
    lp = torch.tensor([[0.0, -0.5, math.log(1.1)]], requires_grad=True)  # float32, as the backends
    mb = {"loss_mask": torch.tensor([[0, 1, 1]]), "old_logprobs": torch.tensor([[0.0, -95.0, 0.0]]),
          "advantages": torch.tensor([[0.0, -1.0, 1.0]])}
    loss, m = make_policy_loss_fn(cfg, num_tokens=2, num_sequences=1)({"logprobs": lp}, mb)
    e20 = math.exp(20)  # 485165195.4097903
    # Token 1: A=-1, rho = exp(20): loss exp(20), or the dual-clip bound 3; no gradient either way.
    # Token 2: A=+1, rho=1.1 inside [0.8, 1.28]: loss -1.1, gradient -1.1. Token mean over 2.
    first = e20 if dual_clip is None else 3.0
    assert loss.item() == pytest.approx((first - 1.1) / 2, rel=1e-6)
    assert m["ratio_mean"] == pytest.approx((e20 + 1.1) / 2, rel=1e-6)
    assert m["approx_kl"] == pytest.approx((0.5 * 94.5**2 + 0.5 * math.log(1.1) ** 2) / 2, rel=1e-6)
    assert m["dual_clipfrac"] == (0.0 if dual_clip is None else 0.5)
    assert all(math.isfinite(v) for v in m.values()), m
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -1.1 / 2]]), rtol=0, atol=1e-7)


def test_policy_loss_fn_needs_ref_logprobs_when_kl_is_on():
    fn = make_policy_loss_fn(AlgorithmConfig(kl_coef=0.1), num_tokens=1, num_sequences=1)
    mb = {"loss_mask": torch.tensor([[0, 1]]), "old_logprobs": t([[0.0, 0.0]]), "advantages": t([[0.0, 1.0]])}
    with pytest.raises(KeyError, match="ref_logprobs"):
        fn({"logprobs": t([[0.0, 0.0]])}, mb)


def test_value_alignment_with_the_backend_convention():
    # tokens: p p a a o a  (prompt, two actions, a tool observation, one action)
    # loss_mask:  0 0 1 1 0 1
    # A critic whose value of a prefix of length L is 0.1 * L. Backend convention:
    # values[j] = V(tokens[:j+1]) = 0.1 * (j + 1).
    critic_out = t([[0.1 * (j + 1) for j in range(6)]], requires_grad=True)
    # Action i was sampled in state tokens[:i], whose value sits at position i - 1, so the
    # critic fields are moved one to the left of the action tokens (returns 1.0 per action):
    sample = {
        "value_mask": torch.tensor([[0, 1, 1, 0, 1, 0]]),   # loss_mask[j + 1]
        "returns": t([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]]),     # return of action j + 1
        "old_values": critic_out.detach().clone(),          # forward_values as it is
    }
    cfg = AlgorithmConfig(value_clip=0.2, loss_reduction="token_mean")
    fn = make_value_loss_fn(cfg, num_tokens=3, num_sequences=1)
    loss, metrics = fn({"values": critic_out}, sample)
    # Each action i compares V(tokens[:i]) = 0.1 * i with its return 1.0:
    # i=2: 0.5 * (0.2 - 1)^2 = 0.32; i=3: 0.5 * 0.49 = 0.245; i=5: 0.5 * 0.25 = 0.125
    # token mean: 0.69 / 3 = 0.23
    assert loss.item() == pytest.approx(0.23, abs=1e-12)
    assert metrics["value_mean"] == pytest.approx((0.2 + 0.3 + 0.5) / 3, abs=1e-12)
    assert metrics["return_mean"] == pytest.approx(1.0, abs=1e-12)
    loss.backward()
    # Gradient lands on critic positions 1, 2 and 4 (the states), (V - R)/3 each.
    torch.testing.assert_close(critic_out.grad, t([[0.0, -0.8 / 3, -0.7 / 3, 0.0, -0.5 / 3, 0.0]]),
                               rtol=0, atol=1e-12)


def _random_policy_batch(gen: torch.Generator, lengths: list[int]):
    seqs = []
    for n in lengths:
        mask = (torch.rand(n, generator=gen) < 0.7).long()
        mask[0] = 0
        seqs.append({
            "loss_mask": mask,
            "old_logprobs": -torch.rand(n, generator=gen, dtype=F64),
            "advantages": torch.randn(n, generator=gen, dtype=F64),
            "ref_logprobs": -torch.rand(n, generator=gen, dtype=F64),
            "logprobs": -torch.rand(n, generator=gen, dtype=F64),
            "entropy": torch.rand(n, generator=gen, dtype=F64),
            "old_values": torch.randn(n, generator=gen, dtype=F64),
            "returns": torch.randn(n, generator=gen, dtype=F64),
            "values": torch.randn(n, generator=gen, dtype=F64),
        })
    return seqs


def _collate(seqs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(s["loss_mask"]) for s in seqs)
    return {k: torch.stack([torch.nn.functional.pad(s[k], (0, width - len(s[k]))) for s in seqs])
            for k in seqs[0]}


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
def test_micro_batching_does_not_change_loss_grads_or_metrics(reduction):
    gen = torch.Generator().manual_seed(1)
    lengths = [6, 3, 9, 4, 7, 5]
    seqs = _random_policy_batch(gen, lengths)
    num_tokens = int(sum(s["loss_mask"].sum() for s in seqs))
    cfg = AlgorithmConfig(kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, loss_reduction=reduction,
                          loss_constant=16.0)

    def run(split: list[int]):
        logp = [s["logprobs"].clone().requires_grad_(True) for s in seqs]
        values = [s["values"].clone().requires_grad_(True) for s in seqs]
        pol = make_policy_loss_fn(cfg, num_tokens, len(seqs))
        val = make_value_loss_fn(cfg, num_tokens, len(seqs))
        total, metrics, start = 0.0, {}, 0
        for size in split:
            idx = range(start, start + size)
            mb = _collate([seqs[i] for i in idx])
            width = mb["loss_mask"].shape[1]
            pad = lambda xs: torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in xs])  # noqa: E731
            mb["value_mask"] = mb["loss_mask"]  # any mask will do for invariance
            out_p = {"logprobs": pad([logp[i] for i in idx]), "entropy": mb["entropy"]}
            loss_p, m_p = pol(out_p, mb)
            loss_v, m_v = val({"values": pad([values[i] for i in idx])}, mb)
            (loss_p + loss_v).backward()
            total += loss_p.item() + loss_v.item()
            for k, v in {**m_p, **m_v}.items():
                metrics[k] = metrics.get(k, 0.0) + v
            start += size
        return total, metrics, [p.grad for p in logp], [v.grad for v in values]

    base = run([6])
    for split in ([1] * 6, [2, 4], [5, 1]):
        other = run(split)
        assert other[0] == pytest.approx(base[0], abs=1e-12)
        assert other[1].keys() == base[1].keys()
        for k in base[1]:
            assert other[1][k] == pytest.approx(base[1][k], abs=1e-12), k
        for a, b in zip(other[2] + other[3], base[2] + base[3], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
