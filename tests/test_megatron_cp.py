"""Context parallel's gather and its gradient, over two real gloo processes (no model).

The Megatron backend under CP (``rl.megatron_backend``, Transformer Engine on GPUs) computes each
rank's per-token outputs from its own slots, all-gathers them (``cp_gather``), runs the unchanged
``loss_fn`` on the whole micro-batch and sums the parameter gradients over the CP group. Here the
model is replaced by one tensor of logits per position, the same on both ranks (what CP attention
guarantees: a causal model's output at a position does not depend on the split). Each rank takes
its share of it, and the test checks that: both ranks get the whole micro-batch's outputs, equal
to ``token_logprobs_and_entropy`` on the whole; the PPO loss (``rl.ppo``, clipped, with entropy) is
the whole's on both; and the two ranks' gradients, summed, are the whole's gradient, while the
logits of CP padding get none. Tolerances: float32 rounding of the same sums in another order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from relayrl.config import AlgorithmConfig
from relayrl.rl.deepspeed_backend import collate, token_logprobs_and_entropy

pytest.importorskip("megatron.core")

from relayrl.rl.megatron_backend import CPLayout, cp_gather, next_token_logprobs_and_entropy  # noqa: E402
from relayrl.rl.ppo import make_policy_loss_fn  # noqa: E402

CP = 2
V = 24
ALG = AlgorithmConfig(entropy_coef=0.01, clip_low=0.2, clip_high=0.28)


def _batch():
    """A micro-batch of four sub-traces, its (b, T, V) logits and the PPO fields."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (7, 12, 3, 9):
        loss_mask = (torch.arange(n) >= 2).long()
        samples.append({"tokens": torch.randint(0, V, (n,), generator=g), "loss_mask": loss_mask})
    mb = collate(samples)
    b, T = mb["tokens"].shape
    logits = torch.randn(b, T, V, generator=g)
    garbage = torch.randn(1, V, generator=g) * 10  # the model's output at CP padding slots
    ref_lp, _ = token_logprobs_and_entropy(logits, mb["tokens"])
    m = mb["loss_mask"].float()
    mb["old_logprobs"] = (ref_lp + 0.1 * torch.randn(b, T, generator=g)) * m
    mb["advantages"] = torch.randn(b, T, generator=g) * m
    return mb, logits, garbage


def _loss_fn(mb):
    return make_policy_loss_fn(ALG, num_tokens=int(mb["loss_mask"].sum()), num_sequences=mb["tokens"].shape[0])


def _rank(rank: int, port: int, out_dir: str, packed: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=CP)
    try:
        mb, logits, garbage = _batch()
        logits.requires_grad_(True)
        garbage.requires_grad_(True)
        b, T = mb["tokens"].shape
        layout = CPLayout(mb["attention_mask"].sum(-1).tolist(), T, CP, rank, packed)
        s = layout.slots[layout.local]
        local = torch.where((s >= 0)[:, None], logits.reshape(b * T, V)[s.clamp(min=0)], garbage)  # this rank's share
        # As MegatronBackend._cp_outputs: own slots' values, gathered, back in rows, masked.
        lp, ent = next_token_logprobs_and_entropy(token_logprobs_and_entropy, local, layout.local_next_tokens(mb["tokens"]))
        mf = mb["attention_mask"].float()
        outputs = {"logprobs": layout.to_rows(cp_gather(lp, layout, None), shift=True) * mf,
                   "entropy": layout.to_rows(cp_gather(ent, layout, None), shift=True) * mf}
        loss, metrics = _loss_fn(mb)(outputs, mb)
        loss.backward()
        grad, garbage_grad = logits.grad.clone(), garbage.grad.clone()
        dist.all_reduce(logits.grad)  # the sum over the CP group (the backend's DP-with-CP all-reduce)
        torch.save({"outputs": {k: v.detach() for k, v in outputs.items()}, "loss": float(loss.detach()),
                    "metrics": {k: float(v) for k, v in metrics.items()}, "own_grad": grad, "summed_grad": logits.grad,
                    "garbage_grad": garbage_grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("packed", [True, False], ids=["thd", "bshd"])
def test_cp_gather_outputs_loss_and_summed_gradient_equal_the_whole(tmp_path, packed):
    import torch.multiprocessing as mp

    from relayrl.rl.distributed import free_port

    tests_dir = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = tests_dir + (os.pathsep + old if old else "")
    try:
        mp.start_processes(_rank, args=(free_port(), str(tmp_path), packed), nprocs=CP, join=True, start_method="spawn")
    finally:
        os.environ["PYTHONPATH"] = old
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(CP)]

    mb, logits, _ = _batch()
    logits.requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(logits, mb["tokens"])
    mf = mb["attention_mask"].float()
    loss, metrics = _loss_fn(mb)({"logprobs": lp * mf, "entropy": ent * mf}, mb)
    loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["outputs"]["logprobs"], (lp * mf).detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(r["outputs"]["entropy"], (ent * mf).detach(), rtol=0, atol=1e-6)
        assert r["loss"] == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-8)
        assert r["metrics"] == pytest.approx({k: float(v) for k, v in metrics.items()}, rel=1e-6, abs=1e-8)
        assert torch.equal(r["garbage_grad"], torch.zeros(1, V))  # CP padding: no gradient
        torch.testing.assert_close(r["summed_grad"], logits.grad, rtol=0, atol=1e-7)
    # Each rank's own gradient is only a share: neither alone is the whole (or zero).
    scale = float(logits.grad.abs().max())
    assert scale > 0
    for r in ranks:
        assert float((r["own_grad"] - logits.grad).abs().max()) > 0.01 * scale
        assert float(r["own_grad"].abs().max()) > 0.01 * scale
