"""The white-box loop with ``spawn_subagent``: a child runs in a context of its own, its answer
returns to the parent as the tool's output, and its trace is a sub-trace with a parent link.
Real CPU engine, tiny model, the ``toy_delegate`` env; links, masks, token-exactness, the
numbering with compaction, tool errors and caps."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from relayrl.config import SubagentConfig
from relayrl.envs.toy_delegate import DelegateParser, FinalAnswerParser, ToyDelegateEnv
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.subagent import SPAWN_TOOL_NAME, SpawnerFactory
from relayrl.types import ToolCall

from test_proxy import RecordingEngine

TASKS = ToyDelegateEnv.default_tasks(num_tasks=64)
LIMITS = AgentLimits(max_turns=9, max_new_tokens=2, max_context_tokens=256)


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    engine = CpuEngine(tiny_model_dir, max_batch_size=8, max_seq_len=256, num_threads=1)
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), DelegateParser())
    yield engine, chat
    engine.shutdown()


def factory(chat, **kw) -> SpawnerFactory:
    cfg = SubagentConfig(enabled=True, max_turns=1, **kw)
    f = SpawnerFactory(cfg, LIMITS, chat, DelegateParser())
    f.parser = FinalAnswerParser()  # subagents.parser=final_answer
    return f


def episodes(parts, seeds, engine=None, **kw):
    eng, chat = parts

    async def go():
        return await asyncio.gather(*(
            run_episode(EpisodeJob(TASKS[s % len(TASKS)], s, seed=s), ToyDelegateEnv(), engine or eng, chat,
                        DelegateParser(), LIMITS, spawner=factory(chat, **kw)) for s in seeds))
    return asyncio.run(go())


@pytest.fixture(scope="module")
def spawning(parts):
    """Episodes (from a fixed set of seeds) in which the random policy called a sub-agent."""
    engine, _ = parts
    rec = RecordingEngine(engine)
    trajs = episodes(parts, range(200), engine=rec)
    found = [t for t in trajs if t.metrics["subagents/spawned"] > 0]
    assert found, "no seed of 200 made the random policy start a sub-agent"
    return found, rec


def test_the_child_is_a_sub_trace_with_a_parent_link(parts, spawning):
    engine, chat = parts
    trajs, _ = spawning
    for traj in trajs:
        subs = traj.sub_traces
        children = [s for s in subs if s.kind == "subagent"]
        main = [s for s in subs if s.kind != "subagent"]
        k = len(children)
        assert k == traj.metrics["subagents/spawned"] == traj.metrics["subtraces/subagent"]
        assert [s.segment for s in subs] == list(range(len(subs))) and all(s.num_segments == len(subs) for s in subs)
        assert [s.segment for s in children] == list(range(k))  # children first
        assert main[-1].segment == len(subs) - 1 and main[-1].reward == traj.reward
        assert all(c.reward == 0.0 and not c.terminal for c in children)
        for c in children:
            parent = subs[c.parent_segment]
            assert parent.kind == "turns" and 0 < c.parent_position <= len(parent.tokens)
            # The child's start: the env's sub-agent messages (it is shown one of the task's words).
            prompts = [chat.prompt_ids([{"role": "system", "content": ToyDelegateEnv.DEFAULT_SUBAGENT_SYSTEM},
                                        {"role": "user", "content": f"say {w}"}], None)
                       for w in TASKS[subs[-1].task_index % len(TASKS)]["targets"]]
            first = c.loss_mask.index(1)
            assert c.tokens[:first] in prompts and c.loss_mask[:first] == [0] * first
            answer = chat.tok.decode(c.tokens[first:], skip_special_tokens=True).strip()
            # The answer comes back at parent_position, in the parent's observation (loss_mask 0).
            back = parent.tokens[c.parent_position:]
            mask_back = parent.loss_mask[c.parent_position:]
            obs_end = mask_back.index(1) if 1 in mask_back else len(back)
            assert mask_back[:obs_end] == [0] * obs_end
            ids = chat.encode(answer)  # the answer is text to the parent: its tokens, as any observation's
            assert any(back[i:i + len(ids)] == ids for i in range(obs_end - len(ids) + 1))
            # The parent's token before the return is the end of its spawn call (an action).
            assert parent.loss_mask[c.parent_position - 1] == 1


def test_sampled_tokens_are_exactly_the_engines(parts, spawning):
    """Each spawning episode again, alone, with the engine's calls recorded: the same trajectory
    (per-episode seeds), and every sampled token in it is exactly the engine's, in the parent's
    or the child's sub-trace."""
    from test_proxy import assert_token_exact

    trajs, _ = spawning
    engine, _ = parts
    for traj in trajs[:3]:
        seed = traj.sub_traces[-1].task_index
        rec = RecordingEngine(engine)
        again = episodes(parts, [seed], engine=rec)[0]
        assert [s.tokens for s in again.sub_traces] == [s.tokens for s in traj.sub_traces]
        assert_token_exact(again.sub_traces, rec)
        assert len(rec.log) == again.metrics["turns"] + again.metrics["subagents/child_turns"]


def test_untrained_children_are_recorded_with_loss_mask_0(parts):
    trajs = [t for t in episodes(parts, range(200), train_children=False) if t.metrics["subagents/spawned"] > 0]
    assert trajs
    for t in trajs:
        for c in (s for s in t.sub_traces if s.kind == "subagent"):
            assert sum(c.loss_mask) == 0 and all(lp == 0.0 for lp in c.rollout_logprobs)


def test_bad_calls_and_caps_are_error_observations(parts):
    engine, chat = parts
    spawner = factory(chat, max_per_episode=1, max_depth=1).for_episode(EpisodeJob(TASKS[0], 0, seed=0),
                                                                       ToyDelegateEnv(), engine)

    async def go():
        await spawner.env.reset(TASKS[0])
        outs = [await spawner.spawn(ToolCall(SPAWN_TOOL_NAME, {"task": 3}), ("main", 0), 5, 1),
                await spawner.spawn(ToolCall(SPAWN_TOOL_NAME, {"task": "x", "extra": 1}), ("main", 0), 5, 1),
                await spawner.spawn(ToolCall(SPAWN_TOOL_NAME, {"task": "x"}), ("main", 0), 5, 2)]
        answer = await spawner.spawn(ToolCall(SPAWN_TOOL_NAME, {"task": "the word"}), ("main", 0), 5, 1)
        outs.append(await spawner.spawn(ToolCall(SPAWN_TOOL_NAME, {"task": "again"}), ("main", 0), 5, 1))
        return outs, answer
    outs, answer = asyncio.run(go())
    assert 'takes one argument, "task"' in outs[0] and 'takes one argument, "task"' in outs[1]
    assert "max_depth=1" in outs[2]
    assert "max_per_episode=1" in outs[3]
    assert not answer.startswith("error") and len(spawner.children) == 1
    # The tool is offered to the main agent only (max_depth=1).
    assert [t["function"]["name"] for t in spawner.tools([], 0)] == [SPAWN_TOOL_NAME] and spawner.tools([], 1) == []


def test_sub_traces_are_counted_by_kind(parts, tiny_model_dir):
    """The per-trajectory counts behind ``rollout/subtraces/{turns,compaction,subagent}``: a
    compacted toy_echo episode is one ``turns`` sub-trace then ``compaction`` ones."""
    from relayrl.config import CompactionConfig
    from relayrl.envs.toy import ToyEchoEnv
    from relayrl.rollout.compaction import make_compactor
    from relayrl.rollout.parsers import PlainParser

    engine, _ = parts
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), PlainParser())
    compactor = make_compactor(CompactionConfig(enabled=True, max_context_tokens=44, summary_max_tokens=2,
                                                prompt="repeat the word"))
    task = ToyEchoEnv.default_tasks(num_tasks=1, num_turns=8)[0]
    traj = asyncio.run(run_episode(EpisodeJob(task, 0, seed=3), ToyEchoEnv(num_turns=8), engine, chat, PlainParser(),
                                   AgentLimits(max_turns=8, max_new_tokens=2, max_context_tokens=64), compactor))
    kinds = [s.kind for s in traj.sub_traces]
    assert len(kinds) >= 2 and kinds == ["turns"] + ["compaction"] * (len(kinds) - 1)
    assert (traj.metrics["subtraces/turns"], traj.metrics["subtraces/compaction"], traj.metrics["subtraces/subagent"]) \
        == (1.0, len(kinds) - 1.0, 0.0)


def test_env_kwargs_shape_the_built_in_tasks():
    """env.kwargs that the env's task generator takes (here num_words, hidden_fraction) shape
    the built-in tasks; the rest are the env's alone."""
    from relayrl.config import EnvConfig
    from relayrl.rl.data import load_tasks

    cfg = EnvConfig(name="toy_delegate", kwargs={"num_turns": 2, "num_words": 8, "hidden_fraction": 0.0,
                                                 "system_prompt": "x"})
    tasks = load_tasks(cfg, ToyDelegateEnv, seed=0)
    assert all(len(t["targets"]) == 2 and not any(t["hidden"]) for t in tasks)
    assert {w for t in tasks for w in t["targets"]} == {f"w{i}" for i in range(8)}
    every = load_tasks(EnvConfig(name="toy_delegate", kwargs={"hidden_fraction": 1.0}), ToyDelegateEnv, seed=0)
    assert all(all(t["hidden"]) and len(t["targets"]) == 3 for t in every)
    with pytest.raises(ValueError, match="hidden_fraction"):
        ToyDelegateEnv(hidden_fraction=1.5)


def test_the_env_credits_a_hidden_turn_only_through_a_sub_agent():
    """By hand, one episode of three turns (hidden, direct, hidden): the first hidden turn is
    answered right after a sub-agent was called, the direct one right, the second hidden one
    right by a guess: 2 of 3 count. Only a reply starting with "call" delegates."""
    env = ToyDelegateEnv(num_turns=3)
    task = {"id": "t", "targets": ["w1", "w2", "w3"], "hidden": [True, False, True]}

    async def go():
        first = await env.reset(task)
        assert first.messages[-1]["content"] == "say call"
        child = await env.subagent_reset("call")  # the parent called on turn 0
        assert child.messages == [{"role": "system", "content": "answer with the word"},
                                  {"role": "user", "content": "say w1"}] and child.tools == []
        assert env.render_subagent_answer("w1") == "say w1"
        steps = [await env.step(ToolCall("answer", {"text": w})) for w in ("w1 x", "w2", "w3")]
        return steps, await env.score()
    steps, score = asyncio.run(go())
    assert [s.observation for s in steps] == ["say w2", "say call", ""] and steps[-1].done
    assert score.reward == pytest.approx(2 / 3)
    assert score.details == {"correct_turns": 2.0, "hidden_turns": 2.0, "hidden_correct": 1.0, "hidden_delegated": 1.0}
    parser = DelegateParser()
    assert parser.parse("call w1") == ToolCall(SPAWN_TOOL_NAME, {"task": "call w1"}, raw="call w1")
    assert [parser.parse(t).name for t in ("a call", "tool", "with w1", "w1 call", "")] == ["answer"] * 5
