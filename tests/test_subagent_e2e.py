"""End to end on a real local Ray cluster: a toy task that needs a sub-agent is learned.

NOT PASSING YET, so opt-in (RELAYRL_SUBAGENT_LEARNING=1). What the runs show (30-40 steps,
about 90 s each now, tiny random model, critic PPO as in test_e2e):

- As written (4 words, half the turns hidden): delegation falls from 0.16-0.23 to 0 by step
  16, and direct and hidden accuracy settle near 0.25, the "always say one word" trap (a guess
  is right on a quarter of the hidden turns too, and beats a delegation chain that pays only
  once both copies, the child's and the parent's, are learned).
- Sub-agents off, same env: the direct turns learn, slowly (0.5 at step 24; toy_echo alone is
  at 0.9 by step 20): the hidden turns' guesses are noise in the one episode reward.
- With an entropy bonus of 0.01 (which fixes toy_echo's trap, see test_e2e) and only answers a
  sub-agent brought back counting on hidden turns: direct accuracy stays about 0.2 for 40
  steps; with children not trained (subagents.train_children=false), likewise, while the parent
  learns to delegate on most turns (0.7) and spawns 2-4 children an episode.
- 8 words, a third of the turns hidden, 60 steps: no learning, delegation spam.

So the sub-agent plumbing and the credit rule (tested in test_subagent.py and
test_subagent_gae.py) are not what stops it: with sub-agents on, the parent's options multiply
(any reply starting with one of four words delegates) and a 2-layer model does not learn the
copy skill under that noise in this budget. A task where delegating is the only way to act
on some turns and cannot be triggered by accident (a dedicated token, per-turn rewards) is the
next thing to try."""

from __future__ import annotations

import os

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


SUBAGENT = ["env.name=toy_delegate", "env.kwargs={num_turns: 3}", "rollout.parser=toy_delegate",
            "rollout.max_turns=9", "subagents.enabled=true", "subagents.parser=final_answer", "subagents.max_turns=1",
            "subagents.max_per_episode=6"]


@pytest.mark.skipif(not os.environ.get("RELAYRL_SUBAGENT_LEARNING"),
                    reason="does not pass yet (hidden turns stay near chance, 0.2-0.3 at step 30, and even the "
                           "direct turns learn far slower than toy_echo's); set RELAYRL_SUBAGENT_LEARNING=1 to run it")
def test_a_task_that_needs_a_sub_agent_is_learned(tmp_path, tiny_model_dir):
    """toy_delegate: on its hidden turns the main agent is told to call a sub-agent and must
    then say a word only the sub-agent is shown, so answering them without one scores 1/4 at
    best (the word is uniform over four). From a random policy, in 30 steps, the hidden turns
    must be learned: the parent calls, the child repeats its word (its tokens credited only
    through the parent's value where its answer returns), the parent repeats the answer."""
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_model_dir, "delegate") + SUBAGENT + [
        "run.deterministic=true", "train.steps=30", "train.save_every=30",
        "algorithm.num_minibatches=4", "algorithm.ppo_epochs=4"])
    metrics = read_metrics(train(cfg))
    hidden_acc = [m["rollout/env/hidden_correct"] / m["rollout/env/hidden_turns"] for m in metrics]
    used = [m["rollout/env/hidden_delegated"] / m["rollout/env/hidden_turns"] for m in metrics]
    print("hidden accuracy", [round(a, 2) for a in hidden_acc], "delegated", [round(u, 2) for u in used])
    assert hidden_acc[0] < 0.2, hidden_acc[:3]
    assert sum(hidden_acc[-5:]) / 5 >= 0.8, hidden_acc  # chance without a sub-agent: 0.25
    assert sum(used[-5:]) / 5 >= 0.9, used
    assert metrics[-1]["rollout/subtraces/subagent"] >= 1.0
