"""The SGLang fleet code against real servers that speak SGLang's API: relayrl's CPU engine
server processes, launched by ``EngineServer`` and put behind the real ``sglang-router`` binary.

Checked for real: launch and health, generation and scoring through the router with the same
``HttpEngineClient`` rollouts use, weight sync by ``update_weights_from_distributed`` (gloo
broadcast in buckets from this process as the trainer's rank 0) and by
``update_weights_from_disk``, a killed server restarted with the *current* weights and version
and swapped back into the router, clean shutdown. SGLang itself is not installed here; its
launch command is only built (``server_command``), not run.
"""

from __future__ import annotations

import asyncio
import shutil
import sys

import pytest
import torch

from relayrl.rl.distributed import free_port
from relayrl.rollout.client import HttpEngineClient
from relayrl.rollout.engine import GenerateRequest, SamplingParams
from relayrl.rollout.sglang_engine import (
    SGLANG_LAUNCH,
    DistributedWeightSender,
    EngineFleet,
    EngineLaunchError,
    EngineServer,
    ServerSpec,
    plan_buckets,
    router_command,
    server_command,
)

CPU_SERVER = [sys.executable, "-m", "relayrl.rollout.server"]
HAVE_ROUTER = shutil.which("sglang-router") is not None or (
    __import__("pathlib").Path(sys.executable).with_name("sglang-router").exists())


def test_commands():
    assert server_command(SGLANG_LAUNCH, "/m", "0.0.0.0", 30001, tp_size=4, extra_args=["--mem-fraction-static", 0.7]) == [
        *SGLANG_LAUNCH, "--model-path", "/m", "--host", "0.0.0.0", "--port", "30001", "--tp-size", "4",
        "--mem-fraction-static", "0.7"]
    assert server_command(CPU_SERVER, "/m", "h", 1, sglang=False)[-6:] == ["--model-path", "/m", "--host", "h", "--port", "1"]
    cmd = router_command(["http://a:1", "http://b:2"], "127.0.0.1", 9, policy="round_robin")
    assert cmd[1:] == ["launch", "--host", "127.0.0.1", "--port", "9", "--policy", "round_robin",
                       "--worker-urls", "http://a:1", "http://b:2"]


def test_plan_buckets_by_hand():
    # 100-byte buckets: a(60) b(30) fit; c(50) starts a new one; d(200) is alone; e(10) after it.
    sizes = [("a", 60), ("b", 30), ("c", 50), ("d", 200), ("e", 10)]
    assert plan_buckets(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_buckets(sizes, 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets([], 100) == []


def _spec(model_dir, tmp_path):
    return ServerSpec(model_path=str(model_dir), launch=CPU_SERVER, sglang=False,
                      extra_args=["--num-threads", "1", "--max-seq-len", "256"], startup_timeout_s=180,
                      log_dir=str(tmp_path / "logs"))


def _perturbed_state(model_dir, scale=0.05, seed=1):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _hf_logprobs(model_dir, state, tokens):
    from transformers import AutoModelForCausalLM

    from relayrl.rl.deepspeed_backend import token_logprobs_and_entropy

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        lp, _ = token_logprobs_and_entropy(model(input_ids=torch.tensor([tokens])).logits, torch.tensor([tokens]))
    return lp[0]


async def _score_and_generate(urls, tokens):
    client = HttpEngineClient(urls, timeout_s=60)
    try:
        scores = await client.score(tokens)
        c = await client.generate(GenerateRequest(tokens, SamplingParams(max_new_tokens=3, seed=7)))
        return scores, c
    finally:
        await client.close()


def test_bad_launch_command_reports_the_log(tmp_path):
    spec = ServerSpec(model_path=str(tmp_path / "nope"), launch=CPU_SERVER, sglang=False, startup_timeout_s=60,
                      log_dir=str(tmp_path / "logs"))
    with pytest.raises(EngineLaunchError, match="exited with code"):
        EngineServer(spec)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ROUTER, reason="the sglang-router binary (sglang extra) is not installed")
def test_fleet_router_sync_restart(tiny_model_dir, tmp_path):
    tokens = [4, 16, 17, 18, 19, 20, 21]
    fleet = EngineFleet([EngineServer(_spec(tiny_model_dir, tmp_path)) for _ in range(2)],
                        router_cfg={"policy": "round_robin", "log_dir": str(tmp_path / "logs")})
    try:
        assert fleet.urls == [fleet.router.url] and len(fleet.update_urls) == 2
        base = _hf_logprobs(tiny_model_dir, {}, tokens)
        scores, c = asyncio.run(_score_and_generate(fleet.urls, tokens))
        torch.testing.assert_close(torch.tensor(scores), base, rtol=0, atol=1e-5)
        assert len(c.output_ids) == 3 and c.weight_version == 0

        # Disaggregated sync: this process is the trainer's rank 0; each server one gloo rank.
        new = _perturbed_state(tiny_model_dir)
        sender = DistributedWeightSender(fleet.update_urls, [1, 1], "127.0.0.1", free_port(), backend="gloo")
        stats = sender.send(new, version=3, bucket_bytes=64 * 1024)
        assert stats["buckets"] > 1 and stats["bytes"] == sum(v.numel() * 4 for v in new.values())
        expected = _hf_logprobs(tiny_model_dir, new, tokens)
        assert float((expected - base).abs().max()) > 1e-2  # the new weights do change the scores
        for url in fleet.update_urls:  # every server, not just the one the router picks
            s, c = asyncio.run(_score_and_generate([url], tokens))
            torch.testing.assert_close(torch.tensor(s), expected, rtol=0, atol=1e-5)
            assert c.weight_version == 3
        sender.close()

        # A server dies; supervision restarts it from the current weights, tagged version 3.
        from safetensors.torch import save_file

        current = tmp_path / "v3"
        shutil.copytree(tiny_model_dir, current)
        save_file({k: v.contiguous() for k, v in new.items() if k != "lm_head.weight"}, str(current / "model.safetensors"))
        old_pid = fleet.servers[0].pid()
        fleet.servers[0].kill()
        assert fleet.dead() == [0]
        assert fleet.supervise(str(current), 3) == [0]
        assert fleet.servers[0].pid() != old_pid and fleet.restarts == 1 and fleet.dead() == []
        assert sorted(w["url"] for w in fleet.router.workers()) == sorted(fleet.update_urls)
        for _ in range(2):  # round robin: both servers answer in turn, both with version 3 weights
            s, c = asyncio.run(_score_and_generate(fleet.urls, tokens))
            torch.testing.assert_close(torch.tensor(s), expected, rtol=0, atol=1e-5)
            assert c.weight_version == 3
    finally:
        fleet.shutdown()
    assert all(s.proc is None for s in fleet.servers) and not fleet.router.proc.alive()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ROUTER, reason="the sglang-router binary (sglang extra) is not installed")
def test_sglang_kind_on_logical_gpus(tiny_model_dir, tmp_path):
    """``engine.kind: sglang`` as a job launches it: a placement group on Ray's logical GPUs, one
    ``EngineServerActor`` per engine holding its GPU bundle, SGLang's command line (here run by
    ``support.cpu_as_sglang``, relayrl's CPU server in SGLang's place), the router in front; a
    server process that dies inside its live actor is relaunched by that actor."""
    import os
    import signal
    from pathlib import Path

    import ray

    from relayrl.config import load_config
    from relayrl.rl.placement import plan_placement, reserve
    from relayrl.rollout.sglang_engine import launch_engines

    tests_dir = str(Path(__file__).parent)
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    fleet = None
    try:
        cfg = load_config(None, [
            f"model.path={tiny_model_dir}", "engine.kind=sglang", "engine.num_engines=2", "engine.router=true",
            "engine.sglang.router_policy=round_robin", "engine.max_seq_len=256", "ray.gpus_per_node=2",
            "engine.sglang.launch_command=[python, -m, support.cpu_as_sglang]",
            "engine.sglang.extra_args=[--num-threads, '1', --max-seq-len, '256']", "engine.sglang.startup_timeout_s=180",
            "rollout.max_context_tokens=256"])
        plan = plan_placement("disaggregated", trainer_ranks=1, num_engines=2, engine_tp=1, cpus_per_bundle=0)
        pg = reserve(plan, timeout_s=60)
        fleet = launch_engines(cfg, str(tiny_model_dir), str(tmp_path / "logs"), (plan, pg))
        assert len(fleet.update_urls) == 2 and fleet.urls == [fleet.router.url]
        logs = sorted((tmp_path / "logs").glob("engine-*-0.log"))
        assert len(logs) == 2 and all("dropped: --tp-size 1" in p.read_text() for p in logs)
        tokens = [4, 16, 17, 18]
        base, _ = asyncio.run(_score_and_generate(fleet.urls, tokens))

        pid = ray.get(fleet.servers[0].pid.remote())
        os.kill(pid, signal.SIGKILL)
        assert fleet.dead() == [0]
        assert fleet.supervise(None, None) == [0]
        assert ray.get(fleet.servers[0].pid.remote()) != pid  # the same actor, a new server process
        assert fleet.dead() == [] and sorted(w["url"] for w in fleet.router.workers()) == sorted(fleet.update_urls)
        for _ in range(2):
            s, c = asyncio.run(_score_and_generate(fleet.urls, tokens))
            assert s == base and len(c.output_ids) == 3
    finally:
        if fleet is not None:
            fleet.shutdown()
        ray.shutdown()


def test_cluster_config_validates():
    """configs/cluster_ppo.yaml is a valid config of the scale-out keys (YAML booleans included)."""
    from pathlib import Path

    from relayrl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "cluster_ppo.yaml")
    assert (cfg.trainer.backend, cfg.engine.kind, cfg.engine.weight_sync, cfg.ray.placement) == (
        "megatron", "sglang", "distributed", "disaggregated")
    assert cfg.trainer.megatron.transformer_engine is True
    assert cfg.trainer.world_size % cfg.trainer.megatron.tensor_parallel_size == 0
