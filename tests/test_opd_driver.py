"""The distill driver's advantage step (routing weights, baseline, task advantage, per-domain
metrics), the prompts env, and the shipped ten-teacher config."""

from __future__ import annotations

import asyncio

import pytest
import torch

from relayrl.config import load_config
from relayrl.opd.distill import distill_advantages
from relayrl.opd.env import PromptEnv
from relayrl.opd.routing import Router
from relayrl.types import SubTrace, ToolCall


def _setup(overrides: list[str]):
    cfg = load_config(None, ["distill.teachers=[{name: m, path: /m, domains: [math]}, "
                             "{name: c, path: /c, domains: [code], weight: 0.5}]"] + overrides)
    subs = [SubTrace(tokens=[1, 2, 3], loss_mask=[0, 1, 1], rollout_logprobs=[0.0] * 3, reward=0.0,
                     trajectory_id="a", domain="math"),
            SubTrace(tokens=[1, 2], loss_mask=[0, 1], rollout_logprobs=[0.0] * 2, reward=0.0,
                     trajectory_id="b", domain="code")]
    samples = [
        {"tokens": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([0, 1, 1]),
         "old_logprobs": torch.tensor([0.0, -1.0, -2.0]), "teacher_logprobs": torch.tensor([0.0, -0.5, -3.0]),
         "advantages": torch.tensor([0.0, 1.0, 1.0])},
        {"tokens": torch.tensor([1, 2]), "loss_mask": torch.tensor([0, 1]),
         "old_logprobs": torch.tensor([0.0, -1.0]), "teacher_logprobs": torch.tensor([0.0, -5.0]),
         "advantages": torch.tensor([0.0, -1.0])},
    ]
    return cfg, subs, samples, Router(cfg.distill.teachers)


def test_advantages_use_each_teachers_weight_the_clip_and_no_baseline():
    # coef 2; math weight 1: -2 * (-1 - -0.5) = 1.0, -2 * (-2 - -3) = -2.0
    # code weight 0.5: -2 * 0.5 * (-1 - -5) = -4.0, clipped to -3
    cfg, subs, samples, router = _setup(["distill.coef=2", "distill.advantage_clip=3", "distill.baseline=false"])
    metrics = distill_advantages(subs, samples, cfg, router)
    assert samples[0]["advantages"].tolist() == [0.0, 1.0, -2.0]
    assert samples[1]["advantages"].tolist() == [0.0, -3.0]
    # sampled reverse KL per sequence: math (-0.5 + 1.0) / 2 = 0.25, code 4.0
    assert metrics["opd/reverse_kl/math"] == pytest.approx(0.25, abs=1e-7)
    assert metrics["opd/reverse_kl/code"] == pytest.approx(4.0, abs=1e-7)
    assert metrics["opd/reverse_kl"] == pytest.approx(2.125, abs=1e-7)
    assert metrics["opd/adv_clipfrac"] == pytest.approx(1 / 3, abs=1e-7)


def test_baseline_then_task_advantage():
    # as above: 1, -2, -3 (clipped); mean -4/3 -> 7/3, -2/3, -5/3; + task 1, 1, -1 -> 10/3, 1/3, -8/3
    cfg, subs, samples, router = _setup(["distill.coef=2", "distill.advantage_clip=3", "distill.baseline=true",
                                         "distill.add_task_advantage=true"])
    distill_advantages(subs, samples, cfg, router)
    torch.testing.assert_close(samples[0]["advantages"], torch.tensor([0.0, 10 / 3, 1 / 3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(samples[1]["advantages"], torch.tensor([0.0, -8 / 3]), rtol=0, atol=1e-6)


def test_prompt_env_rewards_the_expected_first_word():
    async def episode(task, reply):
        env = PromptEnv()
        reset = await env.reset(task)
        step = await env.step(ToolCall("answer", {"text": reply}))
        return reset, step, await env.score()

    task = {"id": "x", "prompt": "topic d1 q0", "domain": "d1", "answer": "a1", "system": "be brief"}
    reset, step, score = asyncio.run(episode(task, "a1 and more"))
    assert reset.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "topic d1 q0"}]
    assert step.done and score.reward == 1.0
    assert asyncio.run(episode(task, "a2"))[2].reward == 0.0
    assert asyncio.run(episode({k: v for k, v in task.items() if k != "answer"}, "a1"))[2].reward == 0.0
    with pytest.raises(ValueError, match="'domain'"):
        PromptEnv.check_task({"prompt": "p"})


def test_shipped_ten_teacher_config_validates():
    cfg = load_config("configs/distill_10_experts.yaml")
    assert len(cfg.distill.teachers) == 10
    assert cfg.distill.max_resident_teachers == 4
    assert Router(cfg.distill.teachers).teacher_for("chemistry") == "science"
