"""A training job with ``engine.kind: sglang`` through the unchanged driver, on Ray's logical
GPUs: the job reserves its placement group, puts the trainer's policy and critic on one GPU
bundle and each engine on its own, launches the engines with SGLang's command line (run here by
``support.cpu_as_sglang``: relayrl's CPU server in SGLang's place, as SGLang needs real GPUs)
behind the sglang-router, syncs weights from disk, and releases everything at the end. (Too few
GPUs: ``tests/test_placement.py`` checks the message ``rl.placement.reserve`` gives at once.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray

from relayrl.config import load_config
from relayrl.rl.driver import train

pytestmark = pytest.mark.slow
TESTS = str(Path(__file__).parent)


def _cfg(tmp_path, model_dir, name):
    return load_config(None, [
        f"run.output_dir={tmp_path}", f"run.name={name}", f"model.path={model_dir}",
        "engine.kind=sglang", "engine.num_engines=2", "engine.router=true", "engine.sglang.router_policy=round_robin",
        "engine.sglang.launch_command=[python, -m, support.cpu_as_sglang]",
        "engine.sglang.extra_args=[--num-threads, '1', --max-seq-len, '256']", "engine.max_seq_len=256",
        "ray.placement=disaggregated", "ray.gpus_per_node=2",
        "env.name=toy_echo", "env.kwargs={num_turns: 2}", "rollout.parser=plain", "rollout.tasks_per_step=4",
        "rollout.max_turns=2", "rollout.max_new_tokens=2", "rollout.max_context_tokens=256",
        "algorithm.kl_coef=0.0", "trainer.micro_batch_size=8", "trainer.num_threads=1",
        "train.steps=2", "train.save_every=2", "logging.wandb=disabled", "logging.progress=false",
    ])


def test_sglang_job_on_logical_gpus(tmp_path, tiny_model_dir):
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    try:
        run_dir = train(_cfg(tmp_path, tiny_model_dir, "sglang_job"))
        deadline = time.monotonic() + 30  # Ray frees a removed placement group asynchronously
        while ray.available_resources().get("GPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("GPU", 0) == 3  # the placement group was released
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/trajectories"] == 4 for r in rows)
    assert [r["engine/min_weight_version"] for r in rows] == [1.0, 2.0]
    assert len(list((run_dir / "engine_logs").glob("engine-*.log"))) == 2

