"""Black-box episodes in real local sandboxes: the example agent (a plain program on the
``openai`` client) runs inside the sandbox's network namespace and reaches the episode's proxy
through the Unix-socket bridge, and nothing else; what it drives is recorded token-exactly
(equal to the white-box episode), a rewriting agent gives more sub-traces, a failing agent is
still scored, and bad black-box settings are start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from relayrl.config import BlackboxConfig, ConfigError, load_config
from relayrl.envs.coding import make_sandbox_provider
from relayrl.envs.local_sandbox import _LOOPBACK_UP, probe_mode
from relayrl.envs.toy import ToyEchoEnv
from relayrl.rollout.agent import AgentLimits, EpisodeJob, run_episode, run_episode_with_retries
from relayrl.rollout.blackbox import check_blackbox_config, run_blackbox_episode, sandbox_spec
from relayrl.rollout.chat import ChatFormat
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.parsers import PlainParser

from test_proxy import RecordingEngine, assert_token_exact

AGENT = Path(__file__).resolve().parents[1] / "examples" / "blackbox_agent" / "agent.py"
TURNS = 3
TASK = ToyEchoEnv.default_tasks(num_tasks=1, num_turns=TURNS)[0]
LIMITS = AgentLimits(max_turns=TURNS, max_new_tokens=2, max_context_tokens=256)

pytestmark = pytest.mark.skipif(probe_mode() == "none", reason="this host allows no sandbox namespaces")


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    engine = CpuEngine(tiny_model_dir, max_batch_size=4, max_seq_len=256, num_threads=1)
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), PlainParser())
    yield engine, chat
    engine.shutdown()


def episode(parts, command: str, engine=None, seed: int = 3, **cfg):
    eng, chat = parts
    bb = BlackboxConfig(enabled=True, command=command, timeout_s=120, **cfg)
    provider = make_sandbox_provider(sandbox_spec(bb))

    async def go():
        try:
            return await run_blackbox_episode(EpisodeJob(TASK, 0, seed=seed), ToyEchoEnv(num_turns=TURNS),
                                              engine or eng, chat, PlainParser(), LIMITS, bb, provider)
        finally:
            await provider.close()
    return asyncio.run(go())


def test_the_openai_agent_runs_in_the_sandbox_and_is_recorded_token_exactly(parts):
    engine, chat = parts
    rec = RecordingEngine(engine)
    traj = episode(parts, f"python {AGENT}", engine=rec)
    assert traj.sub_traces[-1].events[-1].data["exit_code"] == 0, traj.sub_traces[-1].events[-1]
    assert traj.metrics["blackbox/calls"] == TURNS and traj.metrics["blackbox/env_steps"] == TURNS
    assert len(traj.sub_traces) == 1 and traj.metrics["truncated"] == 0.0
    assert_token_exact(traj.sub_traces, rec)
    wb = asyncio.run(run_episode(EpisodeJob(TASK, 0, seed=3), ToyEchoEnv(num_turns=TURNS), engine, chat,
                                 PlainParser(), LIMITS))
    got, want = traj.sub_traces[0], wb.sub_traces[0]
    assert (got.tokens, got.loss_mask, got.rollout_logprobs) == (want.tokens, want.loss_mask, want.rollout_logprobs)
    assert traj.reward == wb.reward and traj.metrics["env/correct_turns"] == wb.metrics["env/correct_turns"]


def test_an_agent_that_rewrites_its_history_gives_one_sub_trace_per_context(parts):
    engine, _ = parts
    rec = RecordingEngine(engine)
    traj = episode(parts, f"python {AGENT} --rewrite-every 1", engine=rec)
    subs = traj.sub_traces
    assert len(subs) == TURNS and [s.segment for s in subs] == list(range(TURNS))
    assert [s.parent_segment for s in subs] == [-1] * TURNS and [s.terminal for s in subs] == [False, False, True]
    assert traj.metrics["subtraces/blackbox"] == TURNS
    assert_token_exact(subs, rec)


class _Listener:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            self.sock.accept()
            self.connected.set()
        except OSError:
            pass


def test_the_agent_reaches_its_proxy_and_not_the_host(parts, tmp_path):
    """Inside the sandbox: the host's loopback listener is unreachable, the proxy answers
    /v1/models with the episode's key and refuses another key."""
    host = _Listener()
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, socket, urllib.request, urllib.error\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {host.port}), timeout=3); print('host reached')\n"
        "except OSError as e:\n    print('host unreachable')\n"
        "def get(key):\n"
        "    r = urllib.request.Request(os.environ['OPENAI_BASE_URL'] + '/models', headers={'Authorization': 'Bearer ' + key})\n"
        "    try:\n        return urllib.request.urlopen(r, timeout=10).status\n"
        "    except urllib.error.HTTPError as e:\n        return e.code\n"
        "print('proxy', get(os.environ['OPENAI_API_KEY']), get('wrong'))\n")
    # The probe travels by blackbox.upload: the sandbox has a private /tmp, it cannot see tmp_path.
    traj = episode(parts, f"python {AGENT} --max-turns 1 >/dev/null; python $RELAYRL_AGENT_DIR/probe.py >&2",
                   upload=[str(probe)])
    out = traj.sub_traces[-1].events[-1].data["stderr_tail"]
    assert "host unreachable" in out and "proxy 200 401" in out, out
    assert not host.connected.is_set()


def test_a_failing_agent_is_still_scored_and_its_exit_recorded(parts):
    traj = episode(parts, f"python {AGENT} --max-turns 1; echo broken >&2; exit 3")
    assert not traj.failed and traj.metrics["blackbox/agent_failed"] == 1.0
    event = traj.sub_traces[-1].events[-1]
    assert event.kind == "agent_exit" and event.data["exit_code"] == 3 and "broken" in event.data["stderr_tail"]
    assert len(traj.sub_traces) == 1 and traj.metrics["blackbox/calls"] == 1
    assert traj.metrics["blackbox/agent_exit_code"] == 3.0


def test_an_agent_that_fails_before_its_first_call_fails_the_episode(parts):
    """Nothing recorded, so nothing to train and nothing to score: a failed episode of kind
    ``agent`` whose error holds the exit code and the stderr tail."""
    traj = episode(parts, "echo 'ModuleNotFoundError: no module named harness' >&2; exit 7")
    assert traj.failed and traj.failure_kind == "agent" and traj.sub_traces == []
    assert "exit code 7" in traj.error and "no module named harness" in traj.error, traj.error
    assert traj.metrics["blackbox/agent_exit_code"] == 7.0 and traj.metrics["blackbox/calls"] == 0.0


def test_a_dead_engine_fails_the_episode_as_an_engine_failure(parts, tiny_model_dir):
    dead = CpuEngine(tiny_model_dir, max_batch_size=1, max_seq_len=256, num_threads=1)
    dead.shutdown()
    _, chat = parts
    bb = BlackboxConfig(enabled=True, command=f"python {AGENT}", timeout_s=120)
    provider = make_sandbox_provider(sandbox_spec(bb))

    async def go():
        async def runner(job, env):
            return await run_blackbox_episode(job, env, dead, chat, PlainParser(), LIMITS, bb, provider)
        try:
            return await run_episode_with_retries(EpisodeJob(TASK, 0), lambda: ToyEchoEnv(num_turns=TURNS), dead,
                                                  chat, PlainParser(), LIMITS, 0, runner=runner)
        finally:
            await provider.close()
    traj = asyncio.run(go())
    assert traj.failed and traj.failure_kind == "engine"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for unshare --net")
def test_the_loopback_fallback_brings_lo_up_without_ip():
    """The ioctl fallback used where ``ip`` is missing: in a fresh network namespace, a
    connection over 127.0.0.1 fails before it and works after it."""
    check = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
             "try:\n    socket.create_connection(s.getsockname(), timeout=2); print('up')\n"
             "except OSError:\n    print('down')\n")
    script = f"{sys.executable} -c \"$CHECK\"; {sys.executable} -c \"$UP\" && {sys.executable} -c \"$CHECK\""
    out = subprocess.run(["unshare", "--net", "/bin/sh", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CHECK": check, "UP": _LOOPBACK_UP})
    assert out.stdout.split() == ["down", "up"], out.stderr


@pytest.mark.parametrize("cfg, key", [
    ({"sandbox": {"kind": "remote", "url": "http://h:1"}}, "blackbox.sandbox.kind"),
    ({"sandbox": {"timeout": 3}}, "blackbox.sandbox"),
    ({"sandbox": {"memory_bytes": "1GB"}}, "blackbox.sandbox.memory_bytes: must be a whole number of bytes"),
    ({"upload": ["/no/such/harness.py"]}, "blackbox.upload"),
])
def test_bad_blackbox_settings_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_blackbox_config(BlackboxConfig(enabled=True, command="true", **cfg))


def test_train_refuses_bad_blackbox_settings_with_exit_code_2(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"blackbox\.command: black-box mode needs"):
        load_config(None, ["blackbox.enabled=true"])
    with pytest.raises(ConfigError, match=r"blackbox\.enabled: in black-box mode"):
        load_config(None, ["blackbox.enabled=true", "blackbox.command=exit", "compaction.enabled=true"])
    (tmp_path / "c.yaml").write_text(
        f"run: {{output_dir: {tmp_path}/runs, name: r}}\nmodel: {{path: {tiny_model_dir}}}\n"
        "rollout: {parser: plain}\nlogging: {wandb: disabled, progress: false}\n")
    proc = subprocess.run([sys.executable, "-m", "relayrl", "train", str(tmp_path / "c.yaml"), "blackbox.enabled=true",
                           "blackbox.command=exit", "blackbox.sandbox={kind: remote}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "blackbox.sandbox.kind" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_in_the_coding_env_the_harness_works_in_the_graded_sandbox(parts, tmp_path):
    """The coding env exposes its sandbox, so the harness runs where ``score`` looks: a harness
    that writes the task's reference solution with its own tools (no relayrl tool calls) scores
    1.0, one that does nothing scores less; the endpoint is reachable from there too."""
    from relayrl.envs.coding import CodingEnv

    _, chat = parts
    task = CodingEnv.default_tasks()[0]
    writer = tmp_path / "solve.py"
    writer.write_text(
        "import json, os, pathlib, urllib.request\n"
        f"for f in json.loads({json.dumps(json.dumps(task['solution']))}):\n"
        "    pathlib.Path(f['path']).parent.mkdir(parents=True, exist_ok=True)\n"
        "    pathlib.Path(f['path']).write_text(f['content'])\n"
        "r = urllib.request.Request(os.environ['OPENAI_BASE_URL'] + '/models',\n"
        "                           headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY']})\n"
        "print('proxy', urllib.request.urlopen(r, timeout=10).status)\n")
    kwargs = {"sandbox": {"loopback": True, "timeout_s": 120, "cpu_seconds": 60}}

    def run(command: str):
        bb = BlackboxConfig(enabled=True, command=command, timeout_s=120, upload=[str(writer)])
        return asyncio.run(run_blackbox_episode(EpisodeJob(task, 0, seed=0), CodingEnv(**kwargs), parts[0], chat,
                                                PlainParser(), LIMITS, bb, provider=None))
    solved = run("python $RELAYRL_AGENT_DIR/solve.py")
    assert solved.reward == 1.0 and solved.metrics["blackbox/agent_failed"] == 0.0, solved.metrics
    idle = run("true")
    assert idle.reward < 1.0
    with pytest.raises(ValueError, match=r"env\.kwargs\.sandbox\.loopback"):
        from relayrl.rollout.blackbox import check_blackbox_env

        check_blackbox_env(CodingEnv())
