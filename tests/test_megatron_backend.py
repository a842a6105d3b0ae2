"""The Megatron-core backend on CPU (gloo), through the shims of ``tests/support/megatron_cpu.py``.

Invariances: on the same tiny Llama weights and batch, DeepSpeed and Megatron give the same
per-token log-probabilities, PPO loss and gradients, and the same weights after one step; packed
micro-batches == padded ones; micro-batch 1 x 4 == 4 x 1; TP=2 (two gloo processes) == TP=1;
PP=2 (two gloo processes, megatron-core's 1F1B schedule) == PP=1 for policy and critic;
context parallel's index arithmetic by hand, and its split-compute-restore == the whole
(the model under CP needs Transformer Engine on GPUs: not run here; the gather's gradient over two
gloo processes is in ``test_megatron_cp``);
Qwen2 (qkv bias) and Qwen3 (qk-norm) forwards equal HF's; the critic equals DeepSpeed's critic;
save/load continues bit-identically. Update tolerance as in ``test_deepspeed_backend``: AdamW's
first step with eps=1e-3 moves a weight by lr * g / (|g| + eps), Lipschitz in g with constant
lr / eps = 1, so float noise in g (~1e-7) stays ~1e-7 in the weights, while a wrongly scaled
gradient moves them by ~1e-4: 2e-6 tells them apart.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import install  # noqa: E402
from support.megatron_tp import nll_loss_fn  # noqa: E402

from relayrl.config import AlgorithmConfig, OptimConfig, TrainerConfig  # noqa: E402
from relayrl.model import make_tiny_model  # noqa: E402
from relayrl.rl.backend import TrainerBackend  # noqa: E402
from relayrl.rl.distributed import free_port  # noqa: E402
from relayrl.rl.deepspeed_backend import collate, token_logprobs_and_entropy  # noqa: E402
from relayrl.rl.megatron_backend import (  # noqa: E402
    CPLayout,
    causal_mask,
    cp_padded_length,
    cp_partition_index,
    cp_positions,
    cp_restore,
    next_token_logprobs_and_entropy,
    pack_index,
    packed_mask,
)
from relayrl.rl.megatron_convert import megatron_to_hf  # noqa: E402
from relayrl.rl.ppo import make_policy_loss_fn, make_value_loss_fn  # noqa: E402

install()
from relayrl.rl.deepspeed_backend import DeepSpeedBackend  # noqa: E402
from relayrl.rl.megatron_backend import MegatronBackend  # noqa: E402

LENGTHS = [7, 12, 3, 9]
OPTIM = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None)


def trainer_cfg(**kw):
    kw.setdefault("micro_batch_size", 2)
    return TrainerConfig(backend="megatron", zero_stage=0, **kw)


def make_samples(lengths, seed=0, vocab=(8, 40)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        loss_mask = (torch.arange(n) >= min(2, n - 1)).long()
        out.append({"tokens": torch.randint(*vocab, (n,), generator=g), "loss_mask": loss_mask})
    return out


def ppo_samples(samples, logprobs, seed=1):
    """PPO fields: old logprobs near the current ones (ratios off 1), random advantages."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, lp in zip(samples, logprobs, strict=True):
        m = s["loss_mask"].float()
        out.append(s | {"old_logprobs": (lp + 0.1 * torch.randn(lp.shape, generator=g)) * m,
                        "advantages": torch.randn(lp.shape, generator=g) * m})
    return out


ALG = AlgorithmConfig(entropy_coef=0.01, clip_low=0.2, clip_high=0.28)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mtiny"), hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mtiny_untied"), hidden_size=32, intermediate_size=64,
                           tie_word_embeddings=False, seed=3)


# ----------------------------------------------------------------------------- masks, by hand


def test_masks_by_hand():
    # Row 0 has 3 real tokens, row 1 has 2 (T=3): True = masked.
    m = causal_mask([3, 2], 3)
    assert m.shape == (2, 1, 3, 3)
    assert m[0, 0].int().tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert m[1, 0].int().tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 1]]  # key 2 is padding
    # Packed [a a | b]: b sees only itself.
    p = packed_mask([2, 1])
    assert p[0, 0].int().tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 0]]
    # Tokens of lengths [2, 1] in rows of T=3 sit at flat positions 0, 1 and 3.
    assert pack_index([2, 1], 3)[0].tolist() == [0, 1, 3]


# ----------------------------------------------------------------------------- context parallel, by hand


def test_cp_chunks_by_hand():
    # 2 cp chunks of equal size; rank i keeps chunks i and 2cp-1-i.
    # 8 tokens, cp 2: chunks [0 1] [2 3] [4 5] [6 7]; rank 0 has the first and last.
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    # 12 tokens, cp 3: six chunks of 2.
    assert [cp_positions(12, 3, r).tolist() for r in range(3)] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    # 4 tokens, cp 2: chunks of one token.
    assert [cp_positions(4, 2, r).tolist() for r in range(2)] == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="length 6 is not a multiple of 2 x cp"):
        cp_positions(6, 2, 0)
    # Padding: up to the next multiple of 2 cp.
    assert [cp_padded_length(n, 2) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert [cp_padded_length(n, 3) for n in (5, 6, 7, 12)] == [6, 6, 12, 12]


def test_cp_packed_layout_by_hand():
    # Sub-traces of 5, 3 and 8 tokens packed (THD), cp 2: padded to 8, 4, 8 (offsets 0, 8, 12).
    # Rank 0: [0 1 | 6 7] of the first, [8 | 11] of the second (chunks of one), [12 13 | 18 19].
    assert cp_partition_index([8, 4, 8], 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19]
    assert cp_partition_index([8, 4, 8], 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 14, 15, 16, 17]
    tokens = torch.arange(24).reshape(3, 8) + 100  # rows of T=8; row j holds 100 + 8j ..
    layouts = [CPLayout([5, 3, 8], 8, 2, r, packed=True) for r in range(2)]
    lay = layouts[0]
    assert lay.padded_lengths == [8, 4, 8] and lay.real_lengths == [5, 3, 8]
    # Slot -> position j*T + t in the (3, 8) rows; -1 is CP padding.
    assert lay.slots.tolist() == [0, 1, 2, 3, 4, -1, -1, -1, 8, 9, 10, -1] + list(range(16, 24))
    # Rank 0's slots: rows' positions 0 1 (pad pad) | 8 (pad) | 16 17 22 23.
    assert lay.local_tokens(tokens).tolist() == [100, 101, 0, 0, 108, 0, 116, 117, 122, 123]
    assert lay.local_positions().tolist() == [0, 1, 6, 7, 0, 3, 0, 1, 6, 7]
    # The token each slot's logits predict: the next one in its row (0 after the row's end, at T-1).
    assert lay.local_next_tokens(tokens).tolist() == [101, 102, 0, 0, 109, 0, 117, 118, 123, 0]
    assert layouts[1].local_tokens(tokens).tolist() == [102, 103, 104, 0, 109, 110, 118, 119, 120, 121]
    # Back to rows: slot values 0..19 in layout order; CP padding (slots 5-7, 11) dropped.
    rows = lay.to_rows(torch.arange(20.0), shift=False)
    assert rows.tolist() == [[0, 1, 2, 3, 4, 0, 0, 0], [8, 9, 10, 0, 0, 0, 0, 0], [12, 13, 14, 15, 16, 17, 18, 19]]
    # Next-token values move one right: position t holds slot t-1's (logits t-1 predict token t).
    assert lay.to_rows(torch.arange(20.0), shift=True)[0].tolist() == [0, 0, 1, 2, 3, 4, 0, 0]


def test_cp_padded_rows_layout_by_hand():
    # Right-padded rows (BSHD) of T=5, cp 2: every row padded to 8, rank 1 keeps columns 2 3 4 5
    # of each (column 5 is CP padding).
    lay = CPLayout([5, 3], 5, 2, 1, packed=False)
    assert lay.padded_lengths == [8, 8] and lay.real_lengths == [5, 5]
    assert lay.slots[lay.local].tolist() == [2, 3, 4, -1, 7, 8, 9, -1]
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    assert lay.local_tokens(tokens).tolist() == [3, 4, 5, 0, 8, 0, 0, 0]
    assert lay.local_positions().tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


@pytest.mark.parametrize("lengths,T,cp,packed", [([8], 8, 2, True), ([5, 3, 8], 8, 2, True), ([7, 1, 12, 4], 12, 3, True),
                                                ([9, 2, 6], 9, 4, True), ([5, 3], 5, 2, False), ([7, 12, 3], 12, 3, False)])
def test_cp_split_then_restore_is_the_identity(lengths, T, cp, packed):
    layouts = [CPLayout(lengths, T, cp, r, packed) for r in range(cp)]
    S = sum(layouts[0].padded_lengths)
    x = torch.randn(S, 3)
    pieces = [x[lay.local] for lay in layouts]
    assert all(p.shape == (S // cp, 3) for p in pieces)  # every rank the same share
    assert torch.equal(cp_restore(pieces, layouts[0].padded_lengths), x)
    # The ranks' slots partition the layout: each slot kept by exactly one rank.
    assert sorted(torch.cat([lay.local for lay in layouts]).tolist()) == list(range(S))
    # Rows: each real token once, in order.
    rows = torch.randn(len(lengths), T)
    shares = [rows.reshape(-1)[lay.slots[lay.local].clamp(min=0)] for lay in layouts]  # CP padding: any value
    got = layouts[0].to_rows(cp_restore(shares, layouts[0].padded_lengths), shift=False)
    real = (torch.arange(T)[None] < torch.tensor(layouts[0].real_lengths)[:, None])
    assert torch.equal(got[real], rows[real]) and not got[~real].any()


def test_next_token_logprobs_and_entropy_by_hand():
    # Two slots of a vocabulary of 3: uniform logits (log p = -log 3, H = log 3), and logits
    # (0, log 2, log 5), so p = (1, 2, 5) / 8: target 2 has log(5/8), H = -sum p log p.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(5.0)]])
    lp, ent = next_token_logprobs_and_entropy(token_logprobs_and_entropy, logits, torch.tensor([1, 2]))
    p = torch.tensor([1.0, 2.0, 5.0]) / 8
    torch.testing.assert_close(lp, torch.tensor([-math.log(3.0), math.log(5 / 8)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.tensor([math.log(3.0), float(-(p * p.log()).sum())]), rtol=0, atol=1e-6)
    # Against log_softmax on random logits, every slot its own target.
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(11, 17, generator=g), torch.randint(0, 17, (11,), generator=g)
    lp, ent = next_token_logprobs_and_entropy(token_logprobs_and_entropy, logits, targets)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, ref.gather(-1, targets[:, None])[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cp,packed", [(2, True), (3, True), (2, False), (4, False)])
def test_cp_split_compute_restore_equals_the_whole(cp, packed):
    """A causal model's logits at a position do not depend on how the sequence is split (what
    CP attention guarantees), so each rank's share of the logits is the whole's at its slots;
    the per-token log-probabilities and entropies computed on the shares and restored equal
    those computed on the whole micro-batch, at every real position. CP padding slots get
    arbitrary logits (they must not leak in)."""
    g = torch.Generator().manual_seed(1)
    samples = make_samples([7, 12, 3, 9], seed=2)
    mb = collate(samples)
    b, T = mb["tokens"].shape
    V = 40
    logits = torch.randn(b, T, V, generator=g)
    ref_lp, ref_ent = token_logprobs_and_entropy(logits, mb["tokens"])
    lengths = mb["attention_mask"].sum(-1).tolist()
    layouts = [CPLayout(lengths, T, cp, r, packed) for r in range(cp)]
    garbage = torch.randn(1, V, generator=g) * 100
    lp_pieces, ent_pieces = [], []
    for lay in layouts:
        s = lay.slots[lay.local]
        local = torch.where((s >= 0)[:, None], logits.reshape(b * T, V)[s.clamp(min=0)], garbage)
        lp, ent = next_token_logprobs_and_entropy(token_logprobs_and_entropy, local, lay.local_next_tokens(mb["tokens"]))
        lp_pieces.append(lp)
        ent_pieces.append(ent)
    m = mb["attention_mask"].bool()
    for pieces, ref in ((lp_pieces, ref_lp), (ent_pieces, ref_ent)):
        got = layouts[0].to_rows(cp_restore(pieces, layouts[0].padded_lengths), shift=True)
        torch.testing.assert_close(got[m], ref[m], rtol=0, atol=1e-6)
        assert torch.equal(got[:, 0], torch.zeros(b))


# ----------------------------------------------------------------------------- DeepSpeed == Megatron


def _mg_grads(backend, samples, loss_fn):
    backend.model.zero_grad(set_to_none=True)
    mb = collate(samples)
    loss, _ = loss_fn(backend._forward(mb, 1.0), mb)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in backend.model.named_parameters()}
    backend.model.zero_grad(set_to_none=True)
    return float(loss.detach()), megatron_to_hf([grads], backend.spec)


def _ds_grads(backend, samples, loss_fn):
    module = backend.engine.module
    module.zero_grad(set_to_none=True)
    mb = collate(samples)
    backend.engine.train()
    backend.engine.set_gradient_accumulation_boundary(True)
    loss, _ = loss_fn(backend._forward(mb, 1.0), mb)
    backend.engine.backward(loss, scale_wrt_gas=False)  # DeepSpeed's own backward, as in its train_step
    grads = {k: p.grad.detach().clone() for k, p in module.named_parameters()}
    backend.engine.zero_grad()
    backend.engine.eval()
    return float(loss.detach()), grads


@pytest.mark.parametrize("fixture", ["tiny", "tiny_untied"])
def test_deepspeed_and_megatron_agree(fixture, request):
    path = request.getfixturevalue(fixture)
    samples = make_samples(LENGTHS)
    ds = DeepSpeedBackend("policy", path, TrainerConfig(micro_batch_size=2, zero_stage=0), OPTIM)
    mg = MegatronBackend("policy", path, trainer_cfg(), OPTIM)
    assert isinstance(mg, TrainerBackend)

    lp_ds, lp_mg = ds.forward_logprobs(samples), mg.forward_logprobs(samples)
    for s, a, b in zip(samples, lp_ds, lp_mg, strict=True):
        assert a.shape == b.shape and a[0] == 0.0 and b[0] == 0.0
        # Action positions (DeepSpeed leaves the prompt's unscored, rl.backend conventions).
        m = s["loss_mask"].bool()
        torch.testing.assert_close(b[m], a[m], rtol=0, atol=2e-6)

    batch = ppo_samples(samples, lp_ds)
    n_tokens = sum(int(s["loss_mask"].sum()) for s in batch)
    loss_fn = make_policy_loss_fn(ALG, num_tokens=n_tokens, num_sequences=len(batch))
    loss_ds, g_ds = _ds_grads(ds, batch, loss_fn)
    loss_mg, g_mg = _mg_grads(mg, batch, loss_fn)
    assert loss_mg == pytest.approx(loss_ds, rel=1e-6, abs=1e-7)
    # Tied weights appear once among DeepSpeed's parameters (as embed_tokens); the Megatron side
    # names the same tensor twice (lm_head is embed_tokens).
    assert set(g_ds) <= set(g_mg) and set(g_mg) - set(g_ds) <= {"lm_head.weight"}
    for k in g_ds:
        scale = float(g_ds[k].abs().max())
        assert scale > 0, k  # every weight gets a gradient from this loss
        torch.testing.assert_close(g_mg[k], g_ds[k], rtol=0, atol=1e-5 * scale, msg=k)

    m_ds, m_mg = ds.train_step(batch, loss_fn), mg.train_step(batch, loss_fn)
    for key in ("loss", "pg_loss", "entropy", "clipfrac", "num_micro_batches"):
        assert m_mg[key] == pytest.approx(m_ds[key], rel=1e-5, abs=1e-7), key
    assert m_mg["grad_norm"] == pytest.approx(m_ds["grad_norm"], rel=1e-5)
    w_ds, w_mg = ds.state_dict_for_engine(), mg.state_dict_for_engine()
    assert sorted(w_ds) == sorted(w_mg)
    moved = max(float((w_mg[k] - mg_init).abs().max()) for k, mg_init in _initial(path).items())
    assert moved > 1e-4  # the step did something
    for k in w_ds:
        torch.testing.assert_close(w_mg[k], w_ds[k], rtol=0, atol=2e-6, msg=k)
    ds.close()


def _initial(path):
    from safetensors.torch import load_file

    state = load_file(Path(path) / "model.safetensors")
    return {k: v for k, v in state.items() if k != "lm_head.weight"}


def test_packed_equals_padded_and_accumulation_is_a_sum(tiny):
    samples = make_samples([7, 12, 3, 9, 5, 11])
    packed = MegatronBackend("policy", tiny, trainer_cfg(micro_batch_size=3, megatron={"pack_sequences": True}), OPTIM)
    padded = MegatronBackend("policy", tiny, trainer_cfg(micro_batch_size=3, megatron={"pack_sequences": False}), OPTIM)
    one_each = MegatronBackend("policy", tiny, trainer_cfg(micro_batch_size=1), OPTIM)
    for a, b in zip(packed.forward_logprobs(samples), padded.forward_logprobs(samples), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    n_tokens = sum(int(s["loss_mask"].sum()) for s in samples)
    metrics = [b.train_step(samples, nll_loss_fn(n_tokens)) for b in (packed, padded, one_each)]
    assert [m["num_micro_batches"] for m in metrics] == [2.0, 2.0, 6.0]
    assert metrics[0]["nll"] == pytest.approx(metrics[2]["nll"], rel=1e-6)
    weights = [b.state_dict_for_engine() for b in (packed, padded, one_each)]
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=2e-6, msg=k)
        torch.testing.assert_close(weights[2][k], weights[0][k], rtol=0, atol=2e-6, msg=k)


# ----------------------------------------------------------------------------- Qwen families


def _qwen_checkpoint(tmp_path, family):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    common = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=1_000_000.0)
    config = Qwen2Config(**common) if family == "qwen2" else Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norm weights, so that a dropped one shows
        for k, p in model.named_parameters():
            if "bias" in k or "norm" in k:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in k else 0.0))
    model.save_pretrained(tmp_path / family, safe_serialization=True)
    return tmp_path / family, model


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_forward_equals_hf(family, tmp_path):
    path, hf = _qwen_checkpoint(tmp_path, family)
    samples = make_samples([9, 5, 12], vocab=(0, 48))
    mg = MegatronBackend("policy", path, trainer_cfg(), OPTIM)
    for s, lp in zip(samples, mg.forward_logprobs(samples), strict=True):
        with torch.no_grad():
            logits = hf(input_ids=s["tokens"][None]).logits
        ref, _ = token_logprobs_and_entropy(logits, s["tokens"][None])
        torch.testing.assert_close(lp, ref[0], rtol=0, atol=2e-6)
    # The export is the checkpoint: same names, same values.
    out = mg.state_dict_for_engine()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- critic


def test_critic_equals_deepspeed_critic(tiny, tmp_path):
    samples = make_samples(LENGTHS)
    ds = DeepSpeedBackend("critic", tiny, TrainerConfig(micro_batch_size=2, zero_stage=0), OPTIM, seed=4)
    ds.export_hf(tmp_path / "critic")  # a saved critic: backbone + its value head
    mg = MegatronBackend("critic", tmp_path / "critic", trainer_cfg(), OPTIM)
    v_ds, v_mg = ds.forward_values(samples), mg.forward_values(samples)
    for a, b in zip(v_ds, v_mg, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)
    g = torch.Generator().manual_seed(2)
    batch = []
    for s, v in zip(samples, v_ds, strict=True):
        vm = s["loss_mask"].roll(-1).clone()
        vm[-1] = 0
        batch.append(s | {"value_mask": vm, "old_values": v * vm, "returns": torch.randn(v.shape, generator=g) * vm})
    n = sum(int(s["value_mask"].sum()) for s in batch)
    loss_fn = make_value_loss_fn(AlgorithmConfig(), num_tokens=n, num_sequences=len(batch))
    m_ds, m_mg = ds.train_step(batch, loss_fn), mg.train_step(batch, loss_fn)
    assert m_mg["vf_loss"] == pytest.approx(m_ds["vf_loss"], rel=1e-6)
    w_ds, w_mg = ds.state_dict_for_engine(), mg.state_dict_for_engine()
    assert "score.weight" in w_mg and sorted(w_ds) == sorted(w_mg)
    for k in w_ds:
        torch.testing.assert_close(w_mg[k], w_ds[k], rtol=0, atol=2e-6, msg=k)
    ds.close()


def test_fresh_critic_head_from_a_causal_lm(tiny):
    """From a causal LM, the critic's fresh head is the one the DeepSpeed critic draws with the
    same seed (``critic.value_model``: HF's init, first draw after ``manual_seed``)."""
    from relayrl.critic.value_model import load_value_model

    a = MegatronBackend("critic", tiny, trainer_cfg(), OPTIM, seed=1)
    c = MegatronBackend("critic", tiny, trainer_cfg(), OPTIM, seed=2)
    torch.manual_seed(1)
    hf = load_value_model(tiny)
    wa, wc = (x.state_dict_for_engine() for x in (a, c))
    assert torch.equal(wa["score.weight"], hf.score.weight.detach())
    assert torch.equal(wa["score.bias"], hf.score.bias.detach())
    assert not torch.equal(wa["score.weight"], wc["score.weight"])


# ----------------------------------------------------------------------------- save / load, export


def test_save_load_continues_identically(tiny, tmp_path):
    samples = make_samples(LENGTHS)
    n = sum(int(s["loss_mask"].sum()) for s in samples)
    a = MegatronBackend("policy", tiny, trainer_cfg(), OptimConfig(lr=1e-3, warmup_steps=3))
    a.train_step(samples, nll_loss_fn(n))
    a.save(tmp_path / "ckpt")
    m2_a = a.train_step(samples, nll_loss_fn(n))
    b = MegatronBackend("policy", tiny, trainer_cfg(), OptimConfig(lr=1e-3, warmup_steps=3))
    b.load(tmp_path / "ckpt")
    assert b.global_step == 1
    m2_b = b.train_step(samples, nll_loss_fn(n))
    assert m2_b == m2_a  # same lr in warm-up, same loss, bit for bit
    wa, wb = a.state_dict_for_engine(), b.state_dict_for_engine()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="role='policy', this backend has role='critic'"):
        MegatronBackend("critic", tiny, trainer_cfg(), OPTIM).load(tmp_path / "ckpt")


def test_export_hf_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    mg = MegatronBackend("policy", tiny, trainer_cfg(), OPTIM)
    samples = make_samples([10])
    mg.train_step(samples, nll_loss_fn(int(samples[0]["loss_mask"].sum())))
    mg.export_hf(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ref, _ = token_logprobs_and_entropy(hf(input_ids=samples[0]["tokens"][None]).logits, samples[0]["tokens"][None])
    torch.testing.assert_close(mg.forward_logprobs(samples)[0], ref[0], rtol=0, atol=2e-6)

    # A hand-off (durable=False) over an earlier one: the same file, rewritten in place.
    mg.export_hf(tmp_path / "handoff", durable=False)
    (weights_file,) = (tmp_path / "handoff").glob("*.safetensors")
    inode = weights_file.stat().st_ino
    first = mg.state_dict_for_engine()
    mg.train_step(samples, nll_loss_fn(int(samples[0]["loss_mask"].sum())))
    mg.export_hf(tmp_path / "handoff", durable=False)
    assert weights_file.stat().st_ino == inode
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "handoff").state_dict()
    now = mg.state_dict_for_engine()
    assert all(torch.equal(now[k], again[k]) for k in again)
    assert any(not torch.equal(now[k], first[k]) for k in again)  # the second step's weights, not the first's


# ----------------------------------------------------------------------------- TP=2 == TP=1


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_two_ranks_equal_one(tiny, tmp_path, tp):
    """Two gloo processes against this process alone: TP=2 (megatron-core allows it on CPU), or
    TP=1 x DP=2 (each rank its shard; gradients summed over the replicas)."""
    import torch.multiprocessing as mp

    from relayrl.rl.distributed import free_port
    from support.megatron_tp import run_rank

    samples = make_samples(LENGTHS)
    tests_dir = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = tests_dir + (os.pathsep + old if old else "")
    try:
        mp.start_processes(run_rank, args=(2, free_port(), str(tiny), str(tmp_path), samples, tp), nprocs=2,
                           join=True, start_method="spawn")
    finally:
        os.environ["PYTHONPATH"] = old
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    one = MegatronBackend("policy", tiny, trainer_cfg(), OPTIM)
    ref = one.forward_logprobs(samples)
    reporting = [r for r in two["ranks"] if r["reports"]]
    assert len(reporting) == (1 if tp == 2 else 2)
    assert sorted(i for r in reporting for i in r["index"]) == list(range(len(samples)))
    for r in two["ranks"]:
        for i, lp in zip(r["index"], r["logprobs"], strict=True):
            torch.testing.assert_close(lp, ref[i], rtol=0, atol=2e-6)
    n = sum(int(s["loss_mask"].sum()) for s in samples)
    m1 = one.train_step(samples, nll_loss_fn(n))
    assert sum(r["metrics"]["nll"] for r in reporting) == pytest.approx(m1["nll"], rel=1e-6)
    for r in two["ranks"]:
        assert r["metrics"]["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    w1 = one.state_dict_for_engine()
    assert sorted(two["weights"]) == sorted(w1)
    for k in w1:
        torch.testing.assert_close(two["weights"][k], w1[k], rtol=0, atol=2e-6, msg=k)


# ----------------------------------------------------------------------------- PP=2 == PP=1


def _spawn(fn, args, nprocs=2):
    import torch.multiprocessing as mp

    tests_dir = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = tests_dir + (os.pathsep + old if old else "")
    try:
        mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="spawn")
    finally:
        os.environ["PYTHONPATH"] = old


def _critic_batch(samples, values, seed=2):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for s, v in zip(samples, values, strict=True):
        vm = s["loss_mask"].roll(-1).clone()
        vm[-1] = 0
        batch.append(s | {"value_mask": vm, "old_values": (v + 0.1 * torch.randn(v.shape, generator=g)) * vm,
                          "returns": torch.randn(v.shape, generator=g) * vm})
    return batch


def test_two_pipeline_stages_equal_one(tiny, tmp_path):
    """PP=2 (two gloo processes, one layer per stage, the tied embedding's copy on the last
    stage) against PP=1 in this process, for a policy (PPO loss) and a critic (value loss):
    the per-token outputs, the metrics of two steps, the weights after each; a checkpoint saved
    after step 1 and loaded into a fresh pipeline continues bit for bit; stages handed different
    samples refuse to run. Tolerances as above."""
    from functools import partial

    from support.megatron_tp import run_pipeline_rank

    samples = make_samples(LENGTHS + [5, 11])  # micro_batch_size 2: three micro-batches
    optim = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None, warmup_steps=3)
    policy = MegatronBackend("policy", tiny, trainer_cfg(), optim)
    critic = MegatronBackend("critic", tiny, trainer_cfg(), optim)  # a fresh head, seed 0 on both sides
    lp, values = policy.forward_logprobs(samples), critic.forward_values(samples)
    p_batch, c_batch = ppo_samples(samples, lp), _critic_batch(samples, values)
    n = sum(int(s["loss_mask"].sum()) for s in samples)
    jobs = [
        {"name": "policy", "role": "policy", "model_dir": str(tiny), "samples": p_batch,
         "loss_fn": partial(make_policy_loss_fn, ALG, num_tokens=n, num_sequences=len(samples))},
        {"name": "critic", "role": "critic", "model_dir": str(tiny), "samples": c_batch,
         "loss_fn": partial(make_value_loss_fn, AlgorithmConfig(), num_tokens=n, num_sequences=len(samples))},
    ]
    _spawn(run_pipeline_rank, (2, free_port(), str(tmp_path), jobs))
    two = torch.load(tmp_path / "pipeline.pt", weights_only=False)

    for job, one, ref in ((jobs[0], policy, lp), (jobs[1], critic, values)):
        got = two[job["name"]]
        ranks = got["ranks"]
        assert [r["stage"] for r in ranks] == [0, 1] and [r["layers"] for r in ranks] == [1, 1]
        assert [r["reports"] for r in ranks] == [True, False]
        assert all(r["replica"] == (0, 0) for r in ranks)  # one replica: both stages see every sample
        for r in ranks:  # the last stage's outputs reach both stages
            for a, b in zip(r["outputs"], ref, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        m1 = one.train_step(job["samples"], job["loss_fn"]())
        w1 = one.state_dict_for_engine()
        m2 = one.train_step(job["samples"], job["loss_fn"]())
        w2 = one.state_dict_for_engine()
        assert m1["num_micro_batches"] == 3.0
        for r in ranks:
            for mine, theirs in ((r["step1"], m1), (r["step2"], m2)):
                assert sorted(mine) == sorted(theirs)
                for key in theirs:
                    assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), (job["name"], key)
            assert r["step2_resumed"] == r["step2"]  # resumed from the step-1 checkpoint, bit for bit
            assert "the pipeline stages of one replica got different samples" in r["mismatch"]
        for mine, theirs in ((got["weights1"], w1), (got["weights2"], w2)):
            assert sorted(mine) == sorted(theirs)
            for k in theirs:
                torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=2e-6, msg=k)
        assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) > 1e-4  # the second step did something
        assert all(torch.equal(got["weights2_resumed"][k], got["weights2"][k]) for k in w2)
        # The export holds the whole model: both stages' layers, embedding and head.
        from safetensors.torch import load_file

        exported = load_file(tmp_path / f"hf_{job['name']}" / "model.safetensors")
        assert set(exported) == set(w2) - ({"lm_head.weight"} if job["role"] == "policy" else set())
        assert all(torch.equal(exported[k], got["weights2"][k]) for k in exported)


def test_replica_of_is_the_trainer_groups_shard():
    from relayrl.rl.megatron_backend import replica_of
    from relayrl.rl.trainer_actor import data_parallel_ranks

    for world, tp, pp, cp in ((4, 1, 1, 1), (4, 2, 1, 1), (8, 2, 1, 1), (8, 4, 1, 1), (2, 1, 2, 1), (4, 1, 2, 1),
                              (8, 2, 2, 1), (8, 1, 4, 1), (2, 1, 1, 2), (8, 2, 1, 2), (8, 1, 2, 2), (16, 2, 2, 2),
                              (8, 2, 1, 4)):
        tc = TrainerConfig(backend="megatron", world_size=world, megatron={
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "context_parallel_size": cp})
        assert [replica_of(r, world, tp, pp, cp) for r in range(world)] == data_parallel_ranks(world, tc)
    # TP 2 x DP 2 x PP 2 in megatron's order: ranks 0-3 are stage 0, 4-7 stage 1; TP pairs adjacent.
    assert [replica_of(r, 8, 2, 2) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    # TP 2 x CP 2 x DP 2 (tp-cp-ep-dp-pp): ranks 0-3 (TP pairs 0 1 and 2 3, CP ranks 0 and 1) are
    # replica 0, ranks 4-7 replica 1.
    assert [replica_of(r, 8, 2, 1, 2) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # CP 2 x DP 2 x PP 2: CP pairs adjacent, replicas alternate, stage 1 from rank 4.
    assert [replica_of(r, 8, 1, 2, 2) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert data_parallel_ranks(4, TrainerConfig(backend="deepspeed", world_size=4)) == [0, 1, 2, 3]


def test_the_trainer_group_counts_each_replica_once():
    """TrainerGroup's reporting ranks: the first of each data shard (TP rank 0 and CP rank 0 of
    the first stage), whatever the layout; built without Ray (its actors are not needed for the plan)."""
    from relayrl.rl.trainer_actor import TrainerGroup, data_parallel_ranks

    for world, tp, pp, cp, want in ((2, 1, 2, 1, [True, False]), (4, 1, 2, 1, [True, True, False, False]),
                                    (8, 2, 2, 1, [True, False, True, False, False, False, False, False]),
                                    (4, 2, 1, 1, [True, False, True, False]),
                                    (4, 1, 1, 2, [True, False, True, False]),
                                    (8, 2, 1, 2, [True, False, False, False, True, False, False, False]),
                                    (8, 1, 2, 2, [True, False, True, False, False, False, False, False])):
        group = TrainerGroup.__new__(TrainerGroup)
        group.world_size = world
        group.dp_ranks = data_parallel_ranks(world, TrainerConfig(backend="megatron", world_size=world, megatron={
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "context_parallel_size": cp}))
        assert group._reporting() == want
        shards = group._shards([{"tokens": torch.zeros(n)} for n in (5, 3, 4, 2)])
        # Every rank of a replica holds its replica's samples; the replicas split all of them.
        assert all(shards[r] == shards[[i for i, d in enumerate(group.dp_ranks) if d == group.dp_ranks[r]][0]]
                   for r in range(world))
        assert sorted(i for r, rep in enumerate(group._reporting()) if rep for i in shards[r]) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- without the shims


def test_without_cuda_or_shims_it_says_so(tiny):
    code = ("from relayrl.config import TrainerConfig\n"
            "from relayrl.rl.megatron_backend import MegatronBackend\n"
            f"MegatronBackend('policy', {str(tiny)!r}, TrainerConfig(backend='megatron'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "trainer.backend=megatron needs CUDA GPUs" in proc.stderr


# ----------------------------------------------------------------------------- bad input


def test_bad_megatron_settings_are_config_errors(tiny, tmp_path):
    from relayrl.config import ConfigError, load_config
    from relayrl.rl.job import check_megatron_available

    with pytest.raises(ConfigError, match=r"trainer.world_size \(3\) must be a multiple of trainer.megatron.tensor_parallel_size \(2\)"):
        load_config(None, ["trainer.backend=megatron", "trainer.world_size=3", "trainer.megatron.tensor_parallel_size=2"])
    # Pipeline: one replica is tp x pp ranks (here 2 x 2 = 4, and 6 is not a multiple of it).
    with pytest.raises(ConfigError, match=r"trainer.world_size \(6\) must be a multiple of trainer.megatron.tensor_parallel_size "
                                          r"\(2\) x trainer.megatron.pipeline_parallel_size \(2\) = 4"):
        load_config(None, ["trainer.backend=megatron", "trainer.world_size=6", "trainer.megatron.tensor_parallel_size=2",
                           "trainer.megatron.pipeline_parallel_size=2"])
    cfg = load_config(None, ["trainer.backend=megatron", "trainer.world_size=8", "trainer.megatron.tensor_parallel_size=2",
                             "trainer.megatron.pipeline_parallel_size=2"])
    assert cfg.trainer.megatron.pipeline_parallel_size == 2  # TP 2 x PP 2 x DP 2: accepted
    # The tiny Llama has 2 layers: 3 stages cannot split them (before any process group starts).
    with pytest.raises(ValueError, match=r"trainer.megatron.pipeline_parallel_size=3 does not divide the model's "
                                         r"num_hidden_layers \(2\)"):
        MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", world_size=3,
                                                      megatron={"pipeline_parallel_size": 3}), rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"trainer.world_size=3 is not a multiple of .* \(1 x 2 x 1\)"):
        MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", world_size=3,
                                                      megatron={"pipeline_parallel_size": 2}), rank=0, world_size=3)
    # The tiny Llama has 2 KV heads: TP 4 cannot split them.
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 does not divide the model's num_key_value_heads"):
        check_megatron_available(str(tiny), 4)
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="model.path: the megatron backend cannot convert .*model_type 'gpt2'"):
        check_megatron_available(str(tmp_path / "gpt2"), 1)
    check_megatron_available(str(tiny), 2)  # fits: no error
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size=3 does not divide the model's num_hidden_layers \(2\)"):
        check_megatron_available(str(tiny), 1, 3)  # at start-up, before any trainer starts
    check_megatron_available(str(tiny), 1, 2)


def test_context_parallel_settings(tiny):
    """CP is accepted by the config (megatron, TE not off, world size a multiple of tp pp cp) and
    refused at start-up on a machine without CUDA and Transformer Engine (this one)."""
    from relayrl.config import ConfigError, load_config
    from relayrl.rl.job import check_megatron_available

    cfg = load_config(None, ["trainer.backend=megatron", "trainer.world_size=8", "trainer.megatron.tensor_parallel_size=2",
                             "trainer.megatron.context_parallel_size=2"])
    assert cfg.trainer.megatron.context_parallel_size == 2  # TP 2 x CP 2 x DP 2
    with pytest.raises(ConfigError, match=r"trainer.world_size \(6\) must be a multiple of trainer.megatron.tensor_parallel_size "
                                          r"\(2\) x trainer.megatron.context_parallel_size \(2\) = 4"):
        load_config(None, ["trainer.backend=megatron", "trainer.world_size=6", "trainer.megatron.tensor_parallel_size=2",
                           "trainer.megatron.context_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"trainer.world_size \(4\) must be a multiple of trainer.megatron.tensor_parallel_size "
                                          r"\(1\) x trainer.megatron.pipeline_parallel_size \(2\) x "
                                          r"trainer.megatron.context_parallel_size \(4\) = 8"):
        load_config(None, ["trainer.backend=megatron", "trainer.world_size=4", "trainer.megatron.pipeline_parallel_size=2",
                           "trainer.megatron.context_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"context_parallel_size \(2\): context parallel runs only in Transformer "
                                          r"Engine's attention .* set trainer.megatron.transformer_engine to auto or true"):
        load_config(None, ["trainer.backend=megatron", "trainer.world_size=2", "trainer.megatron.context_parallel_size=2",
                           "trainer.megatron.transformer_engine=false"])
    with pytest.raises(ConfigError, match=r"context_parallel_size \(2\): context parallel is a megatron backend feature, "
                                          r"trainer.backend is deepspeed"):
        load_config(None, ["trainer.world_size=2", "trainer.megatron.context_parallel_size=2"])
    # At start-up: the job's check, and the backend itself (before any process group starts).
    with pytest.raises(ConfigError, match=r"context_parallel_size=2: context parallel needs Transformer Engine on CUDA GPUs"):
        check_megatron_available(str(tiny), 1, 1, 2)
    with pytest.raises(ConfigError, match=r"context_parallel_size=2: context parallel needs Transformer Engine on CUDA GPUs"):
        MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", world_size=2,
                                                      megatron={"context_parallel_size": 2}), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"trainer.world_size=3 is not a multiple of .* \(1 x 1 x 2\)"):
        MegatronBackend("policy", tiny, TrainerConfig(backend="megatron", world_size=3,
                                                      megatron={"context_parallel_size": 2}), rank=0, world_size=3)
