"""End to end on a real local Ray cluster: a toy task that needs a sub-agent is learned."""

from __future__ import annotations

import pytest
import ray

from relayrl.config import load_config
from relayrl.rl.driver import train

from test_e2e import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


SUBAGENT = ["env.name=toy_delegate", "env.kwargs={}", "rollout.parser=toy_delegate", "rollout.max_turns=3",
            "subagents.enabled=true", "subagents.parser=final_answer", "subagents.max_turns=1",
            "subagents.max_per_episode=2"]


def test_a_task_that_needs_a_sub_agent_is_learned(tmp_path, tiny_model_dir):
    """toy_delegate: the main agent must say a word only a sub-agent is shown. Answering
    without one scores 1/4 at best (the word is uniform over four); learning needs the parent
    to call the sub-agent, the child to repeat its word (trained through the parent's value
    where its answer returns) and the parent to copy that answer. Seen here: about 0.1 at
    step 1, a mean of about 0.9 over the last five of 30 steps."""
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_model_dir, "delegate") + SUBAGENT + [
        "run.deterministic=true", "train.steps=30", "train.save_every=30",
        "algorithm.num_minibatches=4", "algorithm.ppo_epochs=4"])
    metrics = read_metrics(train(cfg))
    rewards = [m["reward/mean"] for m in metrics]
    assert rewards[0] < 0.3, rewards[:3]
    assert sum(rewards[-5:]) / 5 >= 0.85, rewards
    # Every rewarded episode used a sub-agent, and their traces were trained as sub-traces.
    assert metrics[-1]["rollout/subtraces/subagent"] >= 0.9
    assert metrics[-1]["rollout/sub_traces"] > metrics[-1]["rollout/trajectories"]
