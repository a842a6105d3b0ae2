"""The black-box episode runner: your agent harness, in a sandbox, against a per-episode proxy.

One episode::

    env.reset(task)                       first messages + tool schemas -> .relayrl/task.json
    proxy = EpisodeProxy(...)             on a Unix socket in the sandbox's workspace
    sandbox.exec(forwarder & command)     the harness runs; its calls are recorded
    env.score()                           the reward, as in white-box mode

Which calls the reward goes to. The harness may make calls besides its main work: a sub-agent,
a "summarize what you did" or "write a title" request, a rewritten history. The proxy groups
its calls into conversations (``rollout/proxy.py``, "Conversations"):

- a call naming its conversation (``"relayrl_conversation": NAME`` in the body, or the header
  ``X-Relayrl-Conversation: NAME``) belongs to it; its sub-traces form one chain;
- a call naming none continues the context its messages extend; otherwise it opens a new
  conversation: the episode's first call opens ``main``, any later one a side conversation;
- the reward goes to the last sub-trace of ``main`` (the main chain). Side conversations get
  no task reward: a sub-agent's (one its waiting caller continued after) returns into its
  caller as in white-box sub-agents; any other ends at the end of the main chain.

So a side call after the work cannot take the reward from it, and a harness that rewrites its
history keeps the main chain by naming it (``X-Relayrl-Conversation: main`` on every call, as
``examples/blackbox_agent/agent.py`` does); unnamed, the rewritten context is a side chain.
After the env says done, chat calls are refused (409); a call refused at a cap (context,
``max_calls``, ``max_sub_traces``) fails alone (400), and the episode is truncated only if its
main conversation ends on it.

How an episode fails. An engine or env failure under the agent fails it (kind ``engine`` /
``env_error``, as in white-box mode). An agent that exits non-zero (or times out) before any
call was recorded fails it with kind ``agent``, its exit code and stderr tail in ``error``:
there is nothing to train, and a harness that cannot start is a setup error to see, not a
score of 0. One that made calls is scored as usual; either way its exit code is in the
metrics (``blackbox/agent_exit_code``) and its exit code and stderr tail in the ``agent_exit``
event of the last sub-trace.

The bridge. A local sandbox runs every command in a network namespace of its own, so the
harness cannot reach a TCP port on the host (and must not: that is the sandbox's point). The
proxy listens on a Unix socket inside the workspace instead (``.relayrl/proxy.sock``, owned by
the sandbox's uid, mode 0600); a file-system socket is reachable from any network namespace that
can see the file. Inside the sandbox, a small stdlib-only forwarder (``FORWARDER``) listens on
127.0.0.1 of the command's own namespace (``SandboxLimits.loopback``) and relays each
connection to the socket, so an unmodified ``openai`` client finds the endpoint at
``OPENAI_BASE_URL=http://127.0.0.1:PORT/v1``.

What this opens, and what it does not: the command can reach the proxy of its own episode and
nothing else (no route leaves its namespace; other episodes' sockets live in other sandboxes'
workspaces, under other uids); every request needs the episode's key. Through the proxy it can
ask the policy for completions (the point) and run the env's tools (through the anti-hack gate).
On a host that allows no namespaces (sandbox mode ``none``, announced loudly at start-up) there
is no namespace of its own: the forwarder's port is then on the host's loopback, where any local
process could reach it, and only the per-episode key keeps them out.
It can flood the proxy with calls: ``blackbox.max_calls`` and ``blackbox.max_sub_traces`` bound
what one episode records. Tools the harness runs itself are not seen by the gate (see
``rollout/proxy.py``); the sandbox's limits bound them.

Where it runs: the env's own sandbox when the env exposes one as ``env.sandbox`` after
``reset`` (so ``score`` sees what the harness did), otherwise a sandbox of ``blackbox.sandbox``
made for the episode. Both must be local sandboxes on the rollout worker's host: a remote
sandbox server has no way to this host's socket (the sandbox server would need to relay the
proxy itself), so black-box mode with ``kind: remote`` is refused at start-up.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
from pathlib import Path
from typing import Any

from relayrl.config import BlackboxConfig
from relayrl.envs.base import Env, task_domain
from relayrl.envs.sandbox import SandboxError, SandboxLimits
from relayrl.types import Event, ToolCall, Trajectory

from .agent import AgentLimits, EpisodeJob, _Segment, call_env, gate_call, render_dummy
from .chat import ChatFormat
from .engine import Engine
from .proxy import EpisodeProxy, ProxySettings

AGENT_DIR = ".relayrl"
SOCKET = f"{AGENT_DIR}/proxy.sock"
FORWARDER_FAILED = "relayrl: the proxy forwarder did not start"

FORWARDER = r'''
import os, socket, sys, threading
sock_path, port_file = sys.argv[1], sys.argv[2]
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.getsockname()[1]))
os.replace(port_file + ".tmp", port_file)

def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def serve(conn):
    upstream = socket.socket(socket.AF_UNIX)
    try:
        upstream.connect(sock_path)
    except OSError:
        conn.close()
        return
    back = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
    back.start()
    pipe(conn, upstream)
    back.join()
    conn.close()
    upstream.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


def sandbox_spec(cfg: BlackboxConfig) -> dict[str, Any]:
    """The agent's own sandbox: local, loopback up, limits sized for a whole agent run unless
    ``blackbox.sandbox`` says otherwise."""
    spec = {"kind": "local", "timeout_s": cfg.timeout_s, "cpu_seconds": int(cfg.timeout_s) + 1,
            **dict(cfg.sandbox)}
    spec["loopback"] = True
    return spec


def check_blackbox_config(cfg: BlackboxConfig) -> None:
    """Raise ValueError naming the key when black-box mode cannot run as configured."""
    kind = dict(cfg.sandbox).get("kind", "local")
    if kind != "local":
        raise ValueError(f"blackbox.sandbox.kind: black-box agents run in local sandboxes (got {kind!r}); the "
                         "proxy reaches the agent through a Unix socket on the rollout worker's host")
    for path in cfg.upload:
        if not Path(path).is_file():
            raise ValueError(f"blackbox.upload: {path} is not a file; list the harness files to copy into the sandbox")
    unknown = sorted(set(cfg.sandbox) - set(SandboxLimits.__dataclass_fields__) - {"kind", "root"})
    if unknown:
        raise ValueError(f"blackbox.sandbox: unknown key(s) {', '.join(unknown)}; the limits are "
                         f"{', '.join(SandboxLimits.__dataclass_fields__)}")
    try:
        SandboxLimits(**{k: v for k, v in sandbox_spec(cfg).items() if k not in ("kind", "root")})
    except ValueError as e:
        raise ValueError(f"blackbox.sandbox.{e}") from None  # the message starts with the field's name


def check_blackbox_env(env: Any) -> None:
    """Raise ValueError naming the key when the env's own sandbox cannot host the agent: it
    must be local with ``loopback: true`` (the bridge's forwarder) and limits for a whole run."""
    spec = getattr(env, "sandbox_spec", None)
    if not hasattr(env, "sandbox") or (spec is not None and not isinstance(spec, dict)):
        return
    spec = dict(spec or {})
    if spec.get("kind", "local") != "local":
        raise ValueError(f"env.kwargs.sandbox.kind: black-box agents run in the env's sandbox, which must be local "
                         f"(got {spec.get('kind')!r}); the proxy reaches it through a Unix socket on this host")
    if not spec.get("loopback"):
        raise ValueError("env.kwargs.sandbox.loopback: black-box agents run in the env's sandbox, whose network "
                         "namespace needs its loopback up for the proxy's forwarder; set "
                         "env.kwargs.sandbox={loopback: true, timeout_s: 600, cpu_seconds: 600} (the agent is one "
                         "command there, so its limits are the whole run's)")


def agent_command(cfg: BlackboxConfig, key: str) -> str:
    """The shell line run in the sandbox: the forwarder, then the user's command with the
    endpoint in its environment."""
    d = AGENT_DIR
    return "\n".join([
        f'"${{PYTHON:-python3}}" {d}/forward.py {SOCKET} {d}/port 2>{d}/forward.err &',
        "fwd=$!",
        f"for _ in $(seq 1000); do [ -s {d}/port ] && break; sleep 0.01; done",
        f'[ -s {d}/port ] || {{ echo "{FORWARDER_FAILED}: $(cat {d}/forward.err)" >&2; exit 125; }}',
        f"port=$(cat {d}/port)",
        f'export OPENAI_BASE_URL="http://127.0.0.1:$port/v1" OPENAI_API_KEY={shlex.quote(key)}',
        f'export RELAYRL_ENV_URL="http://127.0.0.1:$port/relayrl/v1" RELAYRL_TASK="$PWD/{d}/task.json"',
        f'export RELAYRL_AGENT_DIR="$PWD/{d}/agent"',
        f"( {cfg.command}\n)",
        "code=$?",
        "kill $fwd 2>/dev/null",
        "exit $code",
    ])


async def run_blackbox_episode(job: EpisodeJob, env: Env, engine: Engine, chat: ChatFormat, parser: Any,
                               limits: AgentLimits, cfg: BlackboxConfig, provider: Any = None,
                               gate: Any = None) -> Trajectory:
    """Run one black-box episode to its end; see the module docstring.

    provider: makes the agent's sandbox when the env has none (``make_sandbox_provider`` of
        ``sandbox_spec(cfg)``).
    """
    started = asyncio.get_running_loop().time()
    reset = await call_env(env.reset(job.task), "reset", limits.env_call_timeout_s)
    own = None
    sandbox = getattr(env, "sandbox", None)
    if sandbox is None:
        if provider is None:
            raise ValueError("black-box mode: the env has no sandbox and no blackbox sandbox provider was given")
        sandbox = own = await provider.create()
    gate_counts = {"calls": 0.0, "flagged": 0.0, "blocked": 0.0, "judge_calls": 0.0, "judge_errors": 0.0}
    gate_s = [0.0]
    gate_events = _Segment()
    task_text = next((m["content"] for m in reset.messages if m.get("role") == "user"), None)
    history: list[dict[str, str]] = []

    async def env_step(call: ToolCall) -> tuple[str, bool]:
        turn = proxy.calls - 1
        if gate is not None:
            verdict = await gate_call(gate, call, task_text, history, gate_counts, gate_s, gate_events, turn)
            if verdict is not None and verdict.blocked:
                return render_dummy(env, call, verdict.dummy), False
        result = await call_env(env.step(call), "step", limits.env_call_timeout_s)
        history.append({"role": "assistant", "content": call.raw})
        history.append({"role": chat.observation_role, "content": result.observation})
        return result.observation, result.done

    settings = ProxySettings(max_new_tokens=limits.max_new_tokens, max_context_tokens=limits.max_context_tokens,
                             temperature=limits.temperature, top_p=limits.top_p, seed=job.seed,
                             max_calls=cfg.max_calls, max_sub_traces=cfg.max_sub_traces, model_name=cfg.model_name)
    task = {"messages": reset.messages, "tools": reset.tools}
    proxy = EpisodeProxy(engine, chat, parser, settings, api_key=secrets.token_urlsafe(24), env_step=env_step,
                         task=task)
    try:
        workspace = getattr(sandbox, "workspace", None)
        if workspace is None:
            raise SandboxError("black-box mode needs a local sandbox (one with a workspace on this host)")
        await sandbox.write_file(f"{AGENT_DIR}/task.json", json.dumps(task, ensure_ascii=False))
        await sandbox.write_file(f"{AGENT_DIR}/forward.py", FORWARDER)
        for path in cfg.upload:
            await sandbox.write_file(f"{AGENT_DIR}/agent/{Path(path).name}", Path(path).read_bytes())
        await proxy.start_unix(str(Path(workspace) / SOCKET), uid=getattr(sandbox, "uid", None))
        result = await sandbox.exec(agent_command(cfg, proxy.api_key), timeout=cfg.timeout_s)
    finally:
        await proxy.close()
    if proxy.error is not None:  # the engine or the env failed under the agent: the episode fails
        if own is not None:
            await own.close()
        raise proxy.error
    agent = {"blackbox/calls": float(proxy.calls), "blackbox/env_steps": float(proxy.env_steps),
             "blackbox/refused_calls": float(proxy.refused_calls),
             "blackbox/agent_failed": float(result.exit_code != 0), "blackbox/agent_timed_out": float(result.timed_out),
             "blackbox/agent_exit_code": float(result.exit_code)}
    if not proxy.traces and (result.exit_code != 0 or result.timed_out):
        if own is not None:
            await own.close()
        if result.exit_code == 125 and FORWARDER_FAILED in result.stderr:
            raise SandboxError(result.stderr.strip()[-2000:])  # ours, not the agent's: retried
        how = f"timed out after {cfg.timeout_s:g}s" if result.timed_out else f"exited with exit code {result.exit_code}"
        error = (f"the black-box agent {how} before its first completion (blackbox.command: {cfg.command!r}); "
                 f"stderr tail:\n{result.stderr[-2000:]}")
        metrics = agent | {"time/episode_s": asyncio.get_running_loop().time() - started}
        return Trajectory(job.trajectory_id, [], 0.0, metrics, failed=True, error=error, failure_kind="agent")
    try:
        score = await call_env(env.score(), "score", limits.env_call_timeout_s)
    finally:
        if own is not None:
            await own.close()

    truncated = proxy.truncated or result.timed_out
    subs = proxy.sub_traces(job.trajectory_id, float(score.reward), terminal=not truncated,
                            domain=task_domain(job.task), group_id=job.group_id, task_index=job.task_index)
    if subs:
        agent_event = Event("agent_exit", max(proxy.calls - 1, 0), {
            "exit_code": result.exit_code, "timed_out": result.timed_out,
            "stderr_tail": result.stderr[-2000:]})
        cap = [Event("truncated", max(proxy.calls - 1, 0), {"reason": proxy.truncation})] if proxy.truncated else []
        subs[-1].events += gate_events.events + cap + [agent_event]
    metrics = {
        "turns": float(proxy.calls), "response_tokens": float(proxy.generated_tokens),
        "segments": float(len(subs)), "truncated": float(truncated), **agent,
        "blackbox/children": float(sum(s.parent_segment >= 0 for s in subs)),
        "subtraces/blackbox": float(len(subs)),
        "time/episode_s": asyncio.get_running_loop().time() - started,
        "time/blackbox_engine_s": proxy.seconds_in_engine,
        **({f"antihack_{k}": v for k, v in gate_counts.items()} | {"time/antihack_gate_s": gate_s[0]}
           if gate is not None else {}),
        **{f"env/{k}": float(v) for k, v in score.details.items()},
    }
    return Trajectory(job.trajectory_id, subs, float(score.reward), metrics)
