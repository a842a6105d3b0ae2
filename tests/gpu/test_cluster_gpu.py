"""GPU suite: the scale-out path unshimmed, on one CUDA GPU. Skipped where none is found.

- megatron-core on CUDA (no CPU shims): the DeepSpeed and Megatron backends agree on the same
  tiny Llama, as in ``tests/test_megatron_backend.py``;
- ``configs/cluster_ppo.yaml`` end to end, shrunk to one GPU: Megatron trainer, one SGLang
  server colocated on the same GPU (NCCL cannot put two ranks of a broadcast on one GPU, so the
  weights go as CUDA IPC handles, ``engine.weight_sync: tensor``), the sglang-router in front,
  two training steps. Needs SGLang installed (``pip install "sglang[all]"``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cluster_ppo.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from relayrl.model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpu_tiny"), hidden_size=64, intermediate_size=128)


def test_megatron_equals_deepspeed_on_cuda(tiny):
    pytest.importorskip("megatron.core")
    from relayrl.config import OptimConfig, TrainerConfig
    from relayrl.rl.deepspeed_backend import DeepSpeedBackend
    from relayrl.rl.megatron_backend import MegatronBackend

    g = torch.Generator().manual_seed(0)
    samples = [{"tokens": torch.randint(8, 40, (n,), generator=g), "loss_mask": (torch.arange(n) >= 2).long()}
               for n in (7, 12, 3, 9)]
    optim = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None)
    ds = DeepSpeedBackend("policy", tiny, TrainerConfig(micro_batch_size=2, zero_stage=0), optim)
    mg = MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", micro_batch_size=2), optim)
    for a, b in zip(ds.forward_logprobs(samples), mg.forward_logprobs(samples), strict=True):
        # TF32 matmuls are off by default in torch for fp32; both run the same precision.
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    n = sum(int(s["loss_mask"].sum()) for s in samples)

    def nll(outputs, mb):
        loss = -(outputs["logprobs"] * mb["loss_mask"]).sum() / n
        return loss, {"nll": float(loss.detach())}

    m_ds, m_mg = ds.train_step(samples, nll), mg.train_step(samples, nll)
    assert m_mg["nll"] == pytest.approx(m_ds["nll"], rel=1e-4)
    w_ds, w_mg = ds.state_dict_for_engine(), mg.state_dict_for_engine()
    for k in w_ds:
        torch.testing.assert_close(w_mg[k], w_ds[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed")
def test_cluster_config_end_to_end_on_one_gpu(tiny, tmp_path):
    import ray

    from relayrl.config import load_config
    from relayrl.rl.driver import train

    overrides = [
        f"run.output_dir={tmp_path}", "run.name=gpu_e2e", f"model.path={tiny}", "model.dtype=float32",
        "ray.address=null", "ray.placement=colocated", "ray.gpus_per_node=1",
        "engine.num_engines=1", "engine.sglang.tp_size=1", "engine.weight_sync=tensor", "engine.host=127.0.0.1",
        "engine.max_seq_len=512", "engine.sglang.extra_args=[--mem-fraction-static, '0.3', --disable-cuda-graph]",
        "env.name=toy_echo", "env.kwargs={num_turns: 2}", "rollout.parser=plain", "rollout.num_workers=1",
        "rollout.tasks_per_step=8", "rollout.max_turns=2", "rollout.max_new_tokens=4",
        "rollout.max_context_tokens=256", "rollout.max_weight_lag=0", "compaction.enabled=false",
        "algorithm.critic_warmup_steps=0", "algorithm.num_minibatches=1", "algorithm.lam_actor_adaptive_alpha=null",
        "trainer.world_size=1", "trainer.megatron.tensor_parallel_size=1", "trainer.micro_batch_size=8",
        "trainer.max_tokens_per_micro_batch=null", "train.steps=2", "train.save_every=2",
        "logging.wandb=disabled", "logging.progress=false",
    ]
    cfg = load_config(CONFIG, overrides)
    ray.init(num_gpus=1, include_dashboard=False)
    try:
        run_dir = train(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/trajectories"] == 8 for r in rows)
    assert [r["engine/min_weight_version"] for r in rows] == [1.0, 2.0]
    assert (Path(run_dir) / "checkpoints" / "step_000002" / "policy" / "hf" / "config.json").is_file()
    assert os.path.isdir(Path(run_dir) / "engine_logs")


@pytest.mark.parametrize("setting", [
    {"megatron": {"transformer_engine": False, "pack_sequences": True}},
    pytest.param({"megatron": {"transformer_engine": True, "pack_sequences": True}},
                 marks=pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                          reason="Transformer Engine is not installed")),
    pytest.param({"megatron": {"transformer_engine": True, "pack_sequences": False}},
                 marks=pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                          reason="Transformer Engine is not installed")),
    {"gradient_checkpointing": True},
], ids=["local-packed", "te-packed", "te-padded", "recompute"])
def test_megatron_variants_equal_the_plain_one_on_cuda(tiny, setting):
    """Packing (local mask or TE's THD), TE's layer spec and recomputation change nothing but speed."""
    pytest.importorskip("megatron.core")
    from relayrl.config import OptimConfig, TrainerConfig
    from relayrl.rl.megatron_backend import MegatronBackend

    g = torch.Generator().manual_seed(1)
    samples = [{"tokens": torch.randint(8, 40, (n,), generator=g), "loss_mask": (torch.arange(n) >= 2).long()}
               for n in (7, 12, 3, 9)]
    optim = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None)
    plain = MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", micro_batch_size=4,
                                                          megatron={"transformer_engine": False}), optim)
    other = MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", micro_batch_size=4, **setting), optim)
    for a, b in zip(plain.forward_logprobs(samples), other.forward_logprobs(samples), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-4)  # TE kernels: another summation order
    n = sum(int(s["loss_mask"].sum()) for s in samples)

    def nll(outputs, mb):
        return -(outputs["logprobs"] * mb["loss_mask"]).sum() / n, {}

    assert other.train_step(samples, nll)["grad_norm"] == pytest.approx(plain.train_step(samples, nll)["grad_norm"],
                                                                         rel=1e-3)
