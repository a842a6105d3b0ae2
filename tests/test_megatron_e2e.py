"""The driver unchanged, the trainer swapped by config: ``trainer.backend=megatron`` runs the
same deterministic critic-PPO job as ``deepspeed`` through Ray, and its step matches.

On this CPU machine megatron-core needs the shims of ``tests/support/megatron_cpu.py`` in every
trainer process; Ray's ``worker_process_setup_hook`` installs them (a test harness setting, not
relayrl's: ``Job`` joins the Ray instance the test started). Step 1 of both runs samples the same
episodes (same initial weights, per-episode seeds, ordered batches), so the rollout metrics are
equal and the critic's and actor's losses and gradient norms agree to float noise. (Later steps
sample from weights that differ by float noise and may draw other tokens: one step is the test.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray

from relayrl.config import load_config
from relayrl.rl.driver import train

pytestmark = pytest.mark.slow
pytest.importorskip("megatron.core")

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module", autouse=True)
def ray_with_shims():
    from support.megatron_cpu import install

    install()  # the driver process checks the device before it starts the trainers
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "support.megatron_cpu.install", "env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _run(tmp_path: Path, model_dir: Path, backend: str, name: str | None = None, extra: tuple[str, ...] = ()) -> list[dict]:
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", f"run.name={name or backend}", "run.seed=0", "run.deterministic=true",
        f"model.path={model_dir}", "engine.max_batch_size=32", "engine.max_seq_len=256", "engine.num_threads=1",
        "env.name=toy_echo", "env.kwargs={num_turns: 2}", "rollout.parser=plain", "rollout.tasks_per_step=8",
        "rollout.max_turns=2", "rollout.max_new_tokens=2", "rollout.max_context_tokens=256",
        "rollout.episodes_per_worker=8", "algorithm.kl_coef=0.0", "trainer.zero_stage=0",
        f"trainer.backend={backend}", "trainer.micro_batch_size=4", "trainer.num_threads=1",
        "trainer.policy.lr=1e-3", "trainer.critic.lr=1e-3", "train.steps=1", "train.save_every=1",
        "logging.wandb=disabled", "logging.progress=false", *extra,
    ])
    run_dir = train(cfg)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def deepspeed_step(tmp_path_factory, tiny_model_dir):
    return _run(tmp_path_factory.mktemp("ds"), tiny_model_dir, "deepspeed")


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_megatron_job_matches_deepspeed_job(tmp_path, tiny_model_dir, deepspeed_step, layout):
    """pp2: two pipeline stages per model (trainer.world_size=2, one layer each), placed and
    sharded by the same TrainerGroup: the same step."""
    ds = deepspeed_step
    extra = ("trainer.world_size=2", "trainer.megatron.pipeline_parallel_size=2") if layout == "pp2" else ()
    mg = _run(tmp_path, tiny_model_dir, "megatron", name="megatron", extra=extra)
    assert [r["step"] for r in mg] == [1]
    for key in ("rollout/trajectories", "reward/mean", "rollout/tokens_per_subtrace"):
        assert mg[0][key] == ds[0][key], key
    for key in ("critic/vf_loss", "critic/grad_norm", "actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert mg[0][key] == pytest.approx(ds[0][key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "megatron" / "checkpoints" / "step_000001" / "policy" / "hf" / "model.safetensors").is_file()
