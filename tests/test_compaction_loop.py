"""The agent loop with compaction: an episode longer than its context window goes on as several
sub-traces of one trajectory, each token-exact, the summary trained, the reward on the last."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from relayrl.config import CompactionConfig
from relayrl.envs.toy import ToyEchoEnv
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.compaction import PolicyCompactor, make_compactor
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.parsers import PlainParser

TURNS = 8
TASK = ToyEchoEnv.default_tasks(num_tasks=1, num_turns=TURNS)[0]
PROMPT = "repeat the word"


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    engine = CpuEngine(tiny_model_dir, max_batch_size=4, max_seq_len=256, num_threads=1)
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), PlainParser())
    yield engine, chat
    engine.shutdown()


def run(parts, compactor, max_context_tokens=64):
    engine, chat = parts
    limits = AgentLimits(max_turns=TURNS, max_new_tokens=2, max_context_tokens=max_context_tokens)
    job = EpisodeJob(task=TASK, task_index=0, seed=3)
    env = ToyEchoEnv(num_turns=TURNS)
    return asyncio.run(run_episode(job, env, engine, chat, PlainParser(), limits, compactor))


def compactor(**kw) -> PolicyCompactor:
    # A short request: the tiny model's word-level vocabulary would spell the default one as 56 unknowns.
    base = dict(enabled=True, max_context_tokens=44, summary_max_tokens=2, keep_last_turns=1, prompt=PROMPT)
    return make_compactor(CompactionConfig(**{**base, **kw}))


def test_without_compaction_the_episode_is_cut_by_the_context(parts):
    traj = run(parts, None)
    assert len(traj.sub_traces) == 1 and traj.metrics["truncated"] == 1.0
    assert traj.metrics["turns"] < TURNS
    assert traj.sub_traces[0].events[-1].data == {"reason": "context"}


def test_with_compaction_the_episode_finishes_in_several_sub_traces(parts):
    engine, chat = parts
    traj = run(parts, compactor())
    subs = traj.sub_traces
    assert traj.metrics["turns"] == TURNS and traj.metrics["truncated"] == 0.0
    assert len(subs) >= 2 and traj.metrics["segments"] == len(subs)
    assert [s.segment for s in subs] == list(range(len(subs)))
    assert all(s.num_segments == len(subs) for s in subs)
    assert [s.terminal for s in subs] == [False] * (len(subs) - 1) + [True]
    assert [s.reward for s in subs[:-1]] == [0.0] * (len(subs) - 1) and subs[-1].reward == traj.reward
    start = chat.prompt_ids(chat.with_tool_instructions(
        [{"role": "system", "content": ToyEchoEnv.DEFAULT_SYSTEM}, {"role": "user", "content": f"say {TASK['targets'][0]}"}],
        []), None)
    request_ids = chat.encode(PROMPT)
    for s in subs:
        assert len(s.tokens) == len(s.loss_mask) == len(s.rollout_logprobs)
        assert len(s.tokens) <= 64
    for s in subs[:-1]:
        (event,) = [e for e in s.events if e.kind == "compaction"]
        n = event.data["summary_tokens"]
        assert n >= 1
        # The sub-trace ends with the summary: sampled, trained (loss_mask 1), right after the request.
        assert s.loss_mask[-n:] == [1] * n and all(lp < 0 for lp in s.rollout_logprobs[-n:])
        tail = s.tokens[: len(s.tokens) - n]
        assert any(tail[i:i + len(request_ids)] == request_ids for i in range(len(tail))), "no request"
    for s in subs[1:]:
        # A new sub-trace starts with the episode's start messages, then the summary message.
        prefix = start[: len(start) - 3]  # the start prompt minus its generation prompt
        assert s.tokens[: len(prefix)] == prefix and s.loss_mask[: len(prefix)] == [0] * len(prefix)


def test_summary_not_trained_when_configured(parts):
    traj = run(parts, compactor(train_summary=False))
    for s in traj.sub_traces[:-1]:
        (event,) = [e for e in s.events if e.kind == "compaction"]
        n = event.data["summary_tokens"]
        assert s.loss_mask[-n:] == [0] * n


def test_segment_cap_truncates(parts):
    traj = run(parts, compactor(max_segments=2))
    assert len(traj.sub_traces) == 2 and traj.metrics["truncated"] == 1.0
    assert traj.sub_traces[-1].events[-1].data == {"reason": "max_segments"}


def test_turn_budget_per_segment(parts):
    traj = run(parts, compactor(max_context_tokens=10_000, max_turns_per_segment=3), max_context_tokens=256)
    assert len(traj.sub_traces) == 3  # 8 turns, a cut after every 3rd turn: 3 + 3 + 2


def test_rebuild_keeps_start_summary_and_last_turns():
    c = PolicyCompactor(CompactionConfig(keep_last_turns=2))
    start = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    turns = [[{"role": "assistant", "content": f"a{i}"}, {"role": "tool", "content": f"o{i}"}] for i in range(3)]
    out = c.rebuild(start, turns, "  did things  ")
    assert out == start + [{"role": "user", "content": PolicyCompactor.SUMMARY_PREFIX + "did things"}] \
        + turns[1][:] + turns[2][:]
    assert not c.should_compact(10_000, 0, 10)  # a fresh context is never compacted
    assert CompactionConfig().enabled is False and make_compactor(CompactionConfig()) is None
