"""relayrl's fused CPU kernels against their torch references (``rollout/cpu_kernels.py``).

The engine-level equivalence (the whole model with and without kernels, and against HF) is in
``tests/test_engine.py``; here each kernel on its own, on shapes that reach its edge cases:
lengths 1 and S, strided queries, row counts that split across threads, head dims 8..128.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relayrl.rollout import cpu_kernels
from relayrl.rollout.llama import LlamaSpec, rope_tables

if (_reason := cpu_kernels.load()) is not None:
    pytest.skip(f"CPU kernels unavailable here: {_reason}", allow_module_level=True)


def test_decode_attention_by_hand():
    # One slot, one kv head, two query heads, D = 8, two cached positions. Query 0 scores
    # (q.k / sqrt(8)) 0 and sqrt(8) * ln 3 / sqrt(8) = ln 3: softmax weights 1/4, 3/4.
    d = 8
    k = torch.zeros(1, 1, 4, d)
    v = torch.zeros(1, 1, 4, d)
    k[0, 0, 1, 0] = 1.0
    v[0, 0, 0] = 4.0
    v[0, 0, 1] = 8.0
    k[0, 0, 2:] = 100.0  # beyond the slot's length: must not count
    v[0, 0, 2:] = float("nan")
    q = torch.zeros(1, 1, 2, d)
    q[0, 0, 0, 0] = d**0.5 * torch.log(torch.tensor(3.0))
    out = cpu_kernels.decode_attention(q, k, v, torch.tensor([2]))
    assert torch.allclose(out[0, 0, 0], torch.full((d,), 0.25 * 4 + 0.75 * 8), atol=1e-5)
    assert torch.allclose(out[0, 0, 1], torch.full((d,), 6.0), atol=1e-6)  # equal scores: the mean


@pytest.mark.parametrize("d", cpu_kernels.SUPPORTED_HEAD_DIMS)
def test_decode_attention_matches_sdpa(d):
    torch.manual_seed(d)
    n, hkv, g, s, b = 6, 2, 3, 37, 8
    kc, vc = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    q = torch.randn(n, hkv + 1, g, d)[:, :hkv]  # strided, as the model's view of its qkv
    lengths = torch.tensor([1, 4, 37, 13, 5, 2])  # 1, S, and lengths off the 4-position blocks
    got = cpu_kernels.decode_attention(q, kc, vc, lengths)
    ref = cpu_kernels.decode_attention_reference(q, kc, vc, lengths)
    assert got.shape == (n, hkv, g, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_bad_input():
    kc = torch.zeros(2, 1, 8, 16)
    q = torch.zeros(2, 1, 1, 16)
    with pytest.raises(RuntimeError, match="length"):
        cpu_kernels.decode_attention(q, kc, kc, torch.tensor([1, 9]))
    with pytest.raises(RuntimeError, match="head dim"):
        cpu_kernels.decode_attention(torch.zeros(2, 1, 1, 12), torch.zeros(2, 1, 8, 12), torch.zeros(2, 1, 8, 12), torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.decode_attention(q.double(), kc.double(), kc.double(), torch.tensor([1, 1]))


@pytest.mark.parametrize("shape", [(1, 8), (32, 576), (3, 5, 64), (700, 576)])
def test_rms_norm_matches_torch(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rms_norm_by_hand():
    # Row [3, 4]: mean square 12.5, eps 0: divided by sqrt(12.5); weights 1, 2.
    out = cpu_kernels.rms_norm(torch.tensor([[3.0, 4.0]] * 1), torch.tensor([1.0, 2.0]), 0.0)
    r = 12.5**0.5
    torch.testing.assert_close(out, torch.tensor([[3.0 / r, 8.0 / r]]))


@pytest.mark.parametrize("d", [8, 64, 128])
def test_rope_store_matches_reference(d):
    torch.manual_seed(d)
    heads, hkv, s, n, b = 6, 2, 40, 5, 7
    spec = LlamaSpec.from_hf_config(dict(vocab_size=8, hidden_size=heads * d, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=heads, num_key_value_heads=hkv, rope_theta=500.0))
    cos, sin = rope_tables(spec, s, torch.float32)
    qkv = torch.randn(n, heads + 2 * hkv, d)
    positions = torch.tensor([0, 39, 3, 17, 3])
    k1, v1 = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    k2, v2 = k1.clone(), v1.clone()
    q1 = cpu_kernels.rope_store(qkv, cos, sin, positions, k1, v1, heads)
    q2 = cpu_kernels.rope_store_reference(qkv, cos, sin, positions, k2, v2, heads)
    torch.testing.assert_close(q1, q2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k1, k2, rtol=1e-6, atol=1e-6)  # the new keys, and nothing else moved
    assert torch.equal(v1, v2)


def test_rope_store_position_zero_is_identity():
    # cos(0) = 1, sin(0) = 0: at position 0 the rotation leaves q and k as they are.
    spec = LlamaSpec.from_hf_config(dict(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    cos, sin = rope_tables(spec, 4, torch.float32)
    qkv = torch.randn(1, 4, 16)
    kc, vc = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16)
    q = cpu_kernels.rope_store(qkv, cos, sin, torch.tensor([0]), kc, vc, 2)
    assert torch.equal(q, qkv[:, :2])
    assert torch.equal(kc[0, 0, 0], qkv[0, 2]) and torch.equal(vc[0, 0, 0], qkv[0, 3])
    assert not kc[0, 0, 1:].any()
    with pytest.raises(RuntimeError, match="position"):
        cpu_kernels.rope_store(qkv, cos, sin, torch.tensor([4]), kc, vc, 2)
