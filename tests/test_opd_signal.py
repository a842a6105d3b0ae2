"""The distillation signal (opd/signal.py): hand-worked values, the per-token reference, and the
signal driving the real clipped policy-gradient loss down a reverse KL."""

from __future__ import annotations

import math

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.opd.signal import (
    clipped_fraction,
    exact_reverse_kl,
    opd_advantages,
    opd_advantages_reference,
    sampled_reverse_kl,
)
from relayrl.rl.ppo import make_policy_loss_fn

# One sequence of 4 tokens, the first a prompt token (mask 0) holding garbage.
STUDENT = torch.tensor([[math.inf, -1.0, -2.0, -0.5]])
TEACHER = torch.tensor([[math.nan, -0.5, -4.0, -0.5]])
MASK = torch.tensor([[0, 1, 1, 1]])


def test_advantage_is_minus_coef_times_the_log_ratio():
    # adv = -2 * (logp_s - logp_T):
    #   pos 1: -2 * (-1.0 - -0.5) = -2 * -0.5 = +1.0  (the teacher likes the token more: push up)
    #   pos 2: -2 * (-2.0 - -4.0) = -2 * 2.0  = -4.0  (the teacher likes it less: push down)
    #   pos 3: -2 * (-0.5 - -0.5) = 0.0
    #   pos 0: prompt, 0 whatever inf/nan sit there
    adv = opd_advantages(STUDENT, TEACHER, MASK, coef=2.0)
    assert torch.equal(adv, torch.tensor([[0.0, 1.0, -4.0, 0.0]]))


def test_clip_bounds_the_distillation_term_then_the_task_advantage_adds():
    # clip 3: [0, 1, -4 -> -3, 0]; + task [9 (masked), 0.5, 0.5, 0.5] -> [0, 1.5, -2.5, 0.5]
    task = torch.tensor([[9.0, 0.5, 0.5, 0.5]])
    assert torch.equal(opd_advantages(STUDENT, TEACHER, MASK, 2.0, clip=3.0), torch.tensor([[0.0, 1.0, -3.0, 0.0]]))
    assert torch.equal(opd_advantages(STUDENT, TEACHER, MASK, 2.0, clip=3.0, task_advantages=task),
                       torch.tensor([[0.0, 1.5, -2.5, 0.5]]))
    # one of the three action tokens (|-4| > 3) was clipped
    assert float(clipped_fraction(STUDENT, TEACHER, MASK, 2.0, 3.0)) == pytest.approx(1 / 3, abs=1e-12)
    assert float(clipped_fraction(STUDENT, TEACHER, MASK, 2.0, None)) == 0.0


def test_baseline_subtracts_the_batch_mean_of_the_distillation_term():
    # clip 3 gives [0, 1, -3, 0]; mean over the 3 action tokens = (1 - 3 + 0) / 3 = -2/3
    # -> [0, 1 + 2/3, -3 + 2/3, 0 + 2/3] = [0, 5/3, -7/3, 2/3]; the task advantage adds after
    adv = opd_advantages(STUDENT, TEACHER, MASK, 2.0, clip=3.0, baseline=True)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 5 / 3, -7 / 3, 2 / 3]]), rtol=0, atol=1e-6)
    task = torch.tensor([[9.0, 0.5, 0.5, 0.5]])
    adv = opd_advantages(STUDENT, TEACHER, MASK, 2.0, clip=3.0, task_advantages=task, baseline=True)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 13 / 6, -11 / 6, 7 / 6]]), rtol=0, atol=1e-6)
    # no action token at all: zeros, not nan
    assert torch.equal(opd_advantages(STUDENT, TEACHER, torch.zeros_like(MASK), 2.0, baseline=True),
                       torch.zeros(1, 4))


def test_per_row_coefficient():
    # Row 0 weight 1, row 1 weight 0.5, same log ratios as above (coef 2 x weight):
    # row 0: [0, 1, -4, 0] / 2 * 2 = [0, 1, -4, 0]; row 1: halved -> [0, 0.5, -2, 0]
    s = STUDENT.repeat(2, 1)
    t = TEACHER.repeat(2, 1)
    coef = torch.tensor([[2.0], [1.0]])
    adv = opd_advantages(s, t, MASK.repeat(2, 1), coef)
    assert torch.equal(adv, torch.tensor([[0.0, 1.0, -4.0, 0.0], [0.0, 0.5, -2.0, 0.0]]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="coef"):
        opd_advantages(STUDENT, TEACHER, MASK, -1.0)
    with pytest.raises(ValueError, match="clip"):
        opd_advantages(STUDENT, TEACHER, MASK, 1.0, clip=0.0)


@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("with_task", [False, True])
@pytest.mark.parametrize("baseline", [False, True])
def test_equals_the_per_token_reference(clip, with_task, baseline):
    g = torch.Generator().manual_seed(3)
    b, t = 5, 9
    s = -torch.rand(b, t, generator=g) * 4
    te = -torch.rand(b, t, generator=g) * 4
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    coef = torch.rand(b, 1, generator=g) * 2
    task = torch.randn(b, t, generator=g) if with_task else None
    fast = opd_advantages(s, te, mask, coef, clip, task, baseline)
    ref = opd_advantages_reference(s, te, mask, coef, clip, task, baseline)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)


def test_sampled_reverse_kl_is_the_mean_log_ratio_over_action_tokens():
    # logp_s - logp_T on the action tokens: -0.5, 2.0, 0.0 -> mean 1.5 / 3 = 0.5
    assert sampled_reverse_kl(STUDENT, TEACHER, MASK).tolist() == [0.5]
    # a sequence without an action token gives 0, not nan
    assert sampled_reverse_kl(STUDENT, TEACHER, torch.zeros_like(MASK)).tolist() == [0.0]


def test_exact_reverse_kl_by_hand():
    # p_s = softmax(0, 0) = (1/2, 1/2); p_T = softmax(0, ln 3) = (1/4, 3/4)
    # KL(p_s || p_T) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    t = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    kl = exact_reverse_kl(s, t, torch.tensor([[1, 1]]))
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-9)  # the same distribution
    assert exact_reverse_kl(s, t, torch.tensor([[0, 1]]))[0, 0].item() == 0.0


def test_the_signal_through_the_policy_loss_drives_reverse_kl_down():
    """A student that is one categorical over 6 tokens samples on-policy, the distillation
    advantage is fed to the real PPO loss (rl.ppo, one update per batch, so the ratio is 1 and
    the gradient is the plain policy gradient of the sampled reverse KL); 300 Adam steps bring
    KL(student || teacher) from 1.647 (uniform student) to under a hundredth of that.

    KL(uniform || T) = -ln 6 - mean_v logp_T(v); logits z = (4, 1, 0, 0, -1, 0): mean z = 4/6,
    logsumexp z = ln(e^4 + e + 3 + e^-1) = ln 60.684 = 4.10568, so mean logp_T = 0.66667 - 4.10568
    = -3.43901 and KL = -1.79176 + 3.43901 = 1.64725."""
    torch.manual_seed(0)
    teacher_logp = torch.log_softmax(torch.tensor([4.0, 1.0, 0.0, 0.0, -1.0, 0.0]), -1)
    logits = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28)

    def kl_now() -> float:
        return float(exact_reverse_kl(logits.detach()[None, None], teacher_logp[None, None], torch.ones(1, 1)))

    kl0 = kl_now()
    n = 64
    for _ in range(300):
        logp_all = torch.log_softmax(logits, -1)
        x = torch.multinomial(logp_all.detach().exp(), n, replacement=True)
        logp = logp_all[x][None]  # (1, n) with grad
        mask = torch.ones(1, n, dtype=torch.long)
        adv = opd_advantages(logp.detach(), teacher_logp[x][None], mask, coef=1.0, clip=5.0)
        loss, _ = make_policy_loss_fn(cfg, num_tokens=n, num_sequences=1)(
            {"logprobs": logp}, {"old_logprobs": logp.detach(), "advantages": adv, "loss_mask": mask})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl0 == pytest.approx(1.64725, abs=1e-4)
    assert kl_now() < kl0 / 100, (kl0, kl_now())  # seen: 8e-5
