"""The CPU engine: its forward equals HF's, and continuous batching changes nothing.

- Equivalence: ``LlamaModel`` (full forward, packed prefill, cached batched decode) against HF
  ``*ForCausalLM`` on tiny random Llama / untied Llama with llama3 rope scaling / Qwen2 (q/k/v
  bias) / Qwen3 (q/k norm, head_dim != hidden/heads); and the engine's sampled-token logprobs
  and scores against HF log-softmax at the same temperature.
- Invariance: requests run concurrently (more than there are slots, arriving at once or while
  others decode) give exactly the tokens each gives alone with the same seed.
- Sampling rules with hand-worked numbers; stop tokens, length and context caps; errors.
- Weight updates change outputs and the version.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from relayrl.model import make_tiny_model
from relayrl.rollout import cpu_kernels
from relayrl.rollout.cpu_engine import CpuEngine, SamplingBatch, sample, sample_reference, truncate_probs
from relayrl.rollout.engine import Completion, Engine, EngineError, GenerateRequest, SamplingParams
from relayrl.rollout.llama import LlamaModel, LlamaSpec, onednn_packing_available, read_hf_config, read_safetensors

# Logprobs of a ~40-token vocabulary are O(1); fp32 paths that differ only in summation order
# agree to ~1e-6, so 1e-4 catches any real deviation (a wrong bias, rope or mask moves them by >1e-2).
ATOL = 1e-4


# ----------------------------------------------------------------------------- fixtures


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """HF initialises biases to 0 and norms to 1; make them random so a missing one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)


def _save_hf(tmp_path, name: str, config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    out = tmp_path / name
    model.save_pretrained(out, safe_serialization=True)
    return out


def _small(**kw):
    base = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny checkpoints of each supported variant (built in well under a second each)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    tmp = tmp_path_factory.mktemp("engine_models")
    return {
        "llama_tied": make_tiny_model(tmp / "llama_tied", num_heads=4, num_kv_heads=2, seed=1),
        "llama3_rope_untied": _save_hf(tmp, "llama3", LlamaConfig(**_small(
            tie_word_embeddings=False, head_dim=8, num_attention_heads=8, num_key_value_heads=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}))),
        "qwen2_bias": _save_hf(tmp, "qwen2", Qwen2Config(**_small(tie_word_embeddings=False))),
        "qwen3_qknorm": _save_hf(tmp, "qwen3", Qwen3Config(**_small(head_dim=32, tie_word_embeddings=True))),
    }


@pytest.fixture(scope="module")
def tiny_dir(model_dirs):
    return model_dirs["llama_tied"]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128)
    yield eng
    eng.shutdown()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_logprobs(hf, tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """HF ``log_softmax(logits / T)`` of every position: ``[T, V]``."""
    logits = hf(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1)


def _req(ids, **kw) -> GenerateRequest:
    return GenerateRequest(list(ids), SamplingParams(**kw))


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ----------------------------------------------------------------------------- equivalence with HF


@pytest.mark.parametrize("prepack", [
    pytest.param(True, marks=pytest.mark.skipif(not onednn_packing_available(), reason="torch built without oneDNN")),
    False])
@pytest.mark.parametrize("kernels", [
    pytest.param(True, marks=pytest.mark.skipif(cpu_kernels.load() is not None, reason="CPU kernels unavailable")),
    False])
@pytest.mark.parametrize("variant", ["llama_tied", "llama3_rope_untied", "qwen2_bias", "qwen3_qknorm"])
def test_forward_prefill_decode_equal_hf(model_dirs, variant, prepack, kernels):
    """Full forward, packed prefill of 4 prompts and 6 batched decode steps vs HF logprobs;
    with the linears on oneDNN pre-packed weights (fused residual adds and SwiGLU) and on
    plain ``F.linear`` (the reference); with relayrl's CPU kernels (decode attention, RMSNorm,
    RoPE with the cache writes) and with their torch references."""
    hf = _hf(model_dirs[variant])
    model = LlamaModel.from_pretrained(model_dirs[variant], max_batch_size=4, max_seq_len=64, prepack_weights=prepack,
                                       kernels=kernels)
    assert model.prepack_weights is prepack and model.kernels is kernels
    vocab = model.spec.vocab_size
    seqs = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 17, 9, 12)]
    ref = [_hf_logprobs(hf, s) for s in seqs]

    for s, r in zip(seqs, ref):
        got = torch.log_softmax(model.forward(s), dim=-1)
        torch.testing.assert_close(got, r, atol=ATOL, rtol=0)

    # Prefill different-length prefixes, then decode the rest of each sequence in one batch.
    # Four rows: the decode steps run on the packed copies too (PREPACKED_MIN_ROWS).
    prefix = [5, 3, 2, 4]
    logits = model.prefill([s[:p] for s, p in zip(seqs, prefix)], slots=[0, 1, 2, 3])
    for i, p in enumerate(prefix):
        torch.testing.assert_close(torch.log_softmax(logits[i], -1), ref[i][p - 1], atol=ATOL, rtol=0)
    for step in range(6):
        pos = torch.tensor([p + step for p in prefix])
        toks = torch.tensor([s[p] for s, p in zip(seqs, pos.tolist())])
        logits = model.decode(toks, pos)
        for i in range(4):
            torch.testing.assert_close(torch.log_softmax(logits[i], -1), ref[i][pos[i]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama_tied", "qwen3_qknorm"])
def test_prefill_after_a_cached_prefix_equals_hf(model_dirs, variant):
    """A prompt prefilled at positions 20.. of a slot that holds its first 20 tokens (copied
    from another slot), packed with a fresh prompt: the same logits as HF on the whole, the
    same cache as a whole prefill, and decoding goes on equal. swap_slots exchanges two
    slots' prefixes exactly."""
    hf = _hf(model_dirs[variant])
    model = LlamaModel.from_pretrained(model_dirs[variant], max_batch_size=4, max_seq_len=64)
    g = torch.Generator().manual_seed(3)
    full = torch.randint(0, model.spec.vocab_size, (30,), generator=g).tolist()
    other = torch.randint(0, model.spec.vocab_size, (12,), generator=g).tolist()
    ref = _hf_logprobs(hf, full)
    model.prefill([full], slots=[0])
    model.prefill([full[:20]], slots=[3])
    model.move_slot(3, 2, 20)
    logits = model.prefill([full[20:], other], slots=[2, 1], starts=[20, 0])
    torch.testing.assert_close(torch.log_softmax(logits[0], -1), ref[29], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.log_softmax(logits[1], -1), _hf_logprobs(hf, other)[11], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.k_cache[:, 2, :, :30], model.k_cache[:, 0, :, :30], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.v_cache[:, 2, :, :30], model.v_cache[:, 0, :, :30], atol=1e-5, rtol=0)
    step = model.decode(torch.tensor([7, other[0], 7]), torch.tensor([30, 12, 30]))
    torch.testing.assert_close(step[2], step[0], atol=1e-4, rtol=0)
    before0, before2 = model.k_cache[:, 0, :, :30].clone(), model.k_cache[:, 1, :, :13].clone()
    model.swap_slots(0, 1, 30, 13)
    assert torch.equal(model.k_cache[:, 1, :, :30], before0) and torch.equal(model.k_cache[:, 0, :, :13], before2)
    with pytest.raises(ValueError, match="need slots"):
        model.hidden_packed([full[20:]], starts=[20])
    with pytest.raises(ValueError, match="must be 1..64"):
        model.prefill([full], slots=[0], starts=[40])


@pytest.mark.skipif(not onednn_packing_available(), reason="torch built without oneDNN")
def test_a_weight_load_rebuilds_the_prepacked_copies(model_dirs, tmp_path):
    """Loading other weights into a prepacked model gives what a fresh model of those weights
    gives (the packed copies follow the weights), and the same as the plain path."""
    from transformers import Qwen2Config

    a = model_dirs["qwen2_bias"]
    other = _save_hf(tmp_path, "qwen2_other", Qwen2Config(**_small(tie_word_embeddings=False)), seed=5)
    model = LlamaModel.from_pretrained(a, max_batch_size=2, max_seq_len=32)
    seq = list(range(3, 15))
    before = model.forward(seq)
    model.load_state_dict(read_safetensors(other))
    fresh = LlamaModel.from_pretrained(other, max_batch_size=2, max_seq_len=32, prepack_weights=False)
    torch.testing.assert_close(model.forward(seq), fresh.forward(seq), atol=1e-5, rtol=0)
    assert (model.forward(seq) - before).abs().max() > 0.1


def test_padded_groups_hand_worked():
    """Longest first, a group grows while g * Tmax^2 <= 2 * sum T_i^2: lengths 30, 17, 16 make
    one group (3 * 900 <= 2 * 1445), 3 then starts a new one (4 * 900 > 2 * 1454), 2 joins it."""
    from relayrl.rollout.llama import _padded_groups

    lens = [30, 3, 17, 2, 16]
    offsets = [0, 30, 33, 50, 52, 68]
    groups = _padded_groups(lens, offsets, list(range(5)))
    assert [g.seqs for g in groups] == [[0, 2, 4], [1, 3]]
    a, b = groups
    assert a.tokens.tolist() == list(range(0, 30)) + list(range(33, 50)) + list(range(52, 68))
    assert a.gather.shape == (3, 30) and a.gather[1, :17].tolist() == list(range(33, 50))
    assert a.gather[1, 17:].eq(33).all()  # padding repeats the sequence's first row
    assert a.mask.shape == (3, 1, 30, 30)
    assert a.mask[1, 0, 20, :].tolist() == [True] * 17 + [False] * 13  # padding query sees the real keys
    assert a.mask[0, 0, 4, :].tolist() == [True] * 5 + [False] * 25  # causal
    assert a.take.tolist() == list(range(30)) + list(range(30, 47)) + list(range(60, 76))
    assert not a.in_order and not b.in_order
    single = _padded_groups([4], [0, 4], [0])[0]
    assert single.gather is None and single.in_order


@pytest.mark.parametrize("variant", ["llama_tied", "qwen3_qknorm"])
def test_prefill_in_padded_groups_equals_hf(model_dirs, variant):
    """Five prompts in two padded groups, out of pack order, with one prompt that continues a
    cached prefix: last-token logits equal HF, caches equal prompts prefilled one by one."""
    hf = _hf(model_dirs[variant])
    model = LlamaModel.from_pretrained(model_dirs[variant], max_batch_size=6, max_seq_len=64)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, model.spec.vocab_size, (n,), generator=g).tolist() for n in (30, 3, 17, 2, 16, 24)]
    model.prefill([seqs[5][:10]], slots=[5])  # seq 5 continues from position 10
    prompts = [*seqs[:5], seqs[5][10:]]
    logits = model.prefill(prompts, slots=list(range(6)), starts=[0] * 5 + [10])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.log_softmax(logits[i], -1), _hf_logprobs(hf, s)[-1], atol=ATOL, rtol=0)
    alone = LlamaModel.from_pretrained(model_dirs[variant], max_batch_size=6, max_seq_len=64)
    for i, s in enumerate(seqs):
        alone.prefill([s], slots=[i])
        n = len(s)
        torch.testing.assert_close(model.k_cache[:, i, :, :n], alone.k_cache[:, i, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.v_cache[:, i, :, :n], alone.v_cache[:, i, :, :n], atol=1e-5, rtol=0)


def test_without_the_cpu_kernels_the_model_runs_the_references(model_dirs, monkeypatch):
    """Where the kernels cannot be built, the default falls back to the torch references and
    says why; asking for them is a clear error naming the reason."""
    monkeypatch.setenv("RELAYRL_CPU_KERNELS", "0")
    assert cpu_kernels._load() == "RELAYRL_CPU_KERNELS=0"
    monkeypatch.delenv("RELAYRL_CPU_KERNELS")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in cpu_kernels._load()
    monkeypatch.setattr(cpu_kernels, "load", lambda: "no C++ compiler (test)")
    model = LlamaModel.from_pretrained(model_dirs["llama_tied"], max_batch_size=2, max_seq_len=32)
    assert model.kernels is False
    model.prefill([[1, 2, 3], [4, 5]], slots=[0, 1])
    assert model.decode(torch.tensor([6, 7]), torch.tensor([3, 2])).shape == (2, model.spec.vocab_size)
    with pytest.raises(ValueError, match=r"kernels=True.*no C\+\+ compiler \(test\)"):
        LlamaModel.from_pretrained(model_dirs["llama_tied"], max_batch_size=2, max_seq_len=32, kernels=True)


def test_spec_reads_variant_flags(model_dirs):
    q2 = LlamaSpec.from_hf_config(read_hf_config(model_dirs["qwen2_bias"]))
    q3 = LlamaSpec.from_hf_config(read_hf_config(model_dirs["qwen3_qknorm"]))
    l3 = LlamaSpec.from_hf_config(read_hf_config(model_dirs["llama3_rope_untied"]))
    assert (q2.qkv_bias, q2.o_bias, q2.qk_norm) == (True, False, False)
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim, q3.tie_word_embeddings) == (False, True, 32, True)
    assert l3.rope_scaling is not None and not l3.tie_word_embeddings


def test_unsupported_rope_scaling_is_a_clear_error():
    cfg = dict(_small(), model_type="llama", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        LlamaSpec.from_hf_config(cfg)


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2_bias"])
def test_engine_logprobs_and_scores_equal_hf(model_dirs, variant):
    """Sampled-token logprobs (prefill + decode inside the engine) and scores equal HF at T=0.7."""
    hf = _hf(model_dirs[variant])
    eng = CpuEngine(model_dirs[variant], max_batch_size=2, max_seq_len=64)
    try:
        prompts = [[5, 9, 12, 7], [4, 8, 30, 2, 11, 19]]
        futs = [eng.submit(_req(p, max_new_tokens=12, temperature=0.7, seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
        for p, fut in zip(prompts, futs):
            c = fut.result()
            full = p + c.output_ids
            ref = _hf_logprobs(hf, full, temperature=0.7)
            expected = [ref[len(p) - 1 + j, tok].item() for j, tok in enumerate(c.output_ids)]
            torch.testing.assert_close(torch.tensor(c.output_logprobs), torch.tensor(expected), atol=ATOL, rtol=0)

            scores = eng.submit_score(full, temperature=0.7).result()
            expected_all = [0.0] + [ref[i - 1, full[i]].item() for i in range(1, len(full))]
            torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected_all), atol=ATOL, rtol=0)
    finally:
        eng.shutdown()


# ----------------------------------------------------------------------------- sampling rules


def test_truncate_probs_hand_worked():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    # Row 0, top_p=0.7: mass before each token in sorted order = [0, .5, .8, .95]; keep <= .7
    # -> the 0.5 and 0.3 tokens. Row 1, top_k=3: drop the least likely (0.05).
    out = truncate_probs(probs, top_p=torch.tensor([0.7, 1.0]), top_k=torch.tensor([4, 3]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.0, 0.15, 0.3, 0.5]]))


def test_sample_inverts_the_cdf_of_its_own_row():
    # probs [0.1, 0.2, 0.7] -> cdf [0.1, 0.3, 1.0]; the row's first uniform draw u picks the
    # first token whose cdf exceeds u.
    logits = torch.tensor([[0.1, 0.2, 0.7]]).log()
    u = torch.rand(1, generator=torch.Generator().manual_seed(7), dtype=torch.float64).item()
    expected = 0 if u < 0.1 else (1 if u < 0.3 else 2)
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)], [torch.Generator().manual_seed(7)], 3)
    tok, lp = sample(logits, batch)
    assert tok.tolist() == [expected]
    assert lp.item() == pytest.approx(torch.tensor([0.1, 0.2, 0.7]).log()[expected].item(), abs=1e-6)


@pytest.mark.parametrize("vocab", [49152, 1000, 37])  # a multiple of the CDF block, not one, smaller than one
def test_fast_sample_equals_the_reference(vocab):
    """The two-level CDF picks the same tokens as the whole-row float64 CDF, with the same
    logprobs, on a mixed batch: temperatures, greedy rows, top-k and top-p rows."""
    n = 48
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    params = []
    for i in range(n):
        kind = i % 6
        params.append(SamplingParams(
            temperature=[1.0, 0.7, 0.0, 1.3, 1.0, 1.0][kind],
            top_k=20 if kind == 4 else -1, top_p=0.9 if kind == 5 else 1.0))

    def batch(ps):
        return SamplingBatch.build(ps, [torch.Generator().manual_seed(1000 + i) for i in range(len(ps))], vocab)

    plain = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k < 0 and p.top_p == 1.0]
    cases = [(list(range(n)), params),  # mixed: greedy and truncated rows take their own paths
             (plain, [params[i] for i in plain]),  # no greedy or truncated row at all
             ([0, 1, 2, 3], [SamplingParams(temperature=0.0)] * 4)]  # all greedy
    for rows, ps in cases:
        fast_tok, fast_lp = sample(logits[rows], batch(ps))
        ref_tok, ref_lp = sample_reference(logits[rows], batch(ps))
        assert fast_tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(fast_lp, ref_lp, atol=2e-5, rtol=0)
    # The draws really are spread out (the test would pass trivially if every row took the argmax).
    tok, _ = sample(logits, batch(params))
    assert (tok != logits.argmax(-1)).sum() > n // 4


def test_logprob_is_before_truncation(engine):
    """top_k=1 samples the argmax, and its logprob is the full distribution's, not 0."""
    p = [5, 6, 7]
    greedy = engine.submit(_req(p, max_new_tokens=5, temperature=0.0, ignore_eos=True)).result()
    topk1 = engine.submit(_req(p, max_new_tokens=5, temperature=1.0, top_k=1, seed=3, ignore_eos=True)).result()
    nucleus = engine.submit(_req(p, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=4, ignore_eos=True)).result()
    assert topk1.output_ids == greedy.output_ids == nucleus.output_ids
    torch.testing.assert_close(torch.tensor(topk1.output_logprobs), torch.tensor(greedy.output_logprobs), atol=1e-6, rtol=0)
    assert all(lp < -0.1 for lp in topk1.output_logprobs)  # a ~40-way random model is never sure


# ----------------------------------------------------------------------------- continuous batching


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_concurrent_equals_alone(engine, temperature):
    """10 requests (4 slots) of different lengths at once == each alone, same seed."""
    prompts = _prompts(10, engine.vocab_size, seed=1)
    reqs = [_req(p, max_new_tokens=3 + 2 * i, temperature=temperature, seed=100 + i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    together = engine.generate_many(reqs)
    alone = [engine.submit(r).result() for r in reqs]
    for t, a, r in zip(together, alone, reqs):
        assert t.output_ids == a.output_ids
        assert len(t.output_ids) == r.sampling.max_new_tokens and t.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(t.output_logprobs), torch.tensor(a.output_logprobs), atol=1e-5, rtol=0)
    if temperature > 0:  # different seeds really sample differently
        assert len({tuple(c.output_ids[:3]) for c in together}) > 5


def test_request_arriving_while_others_decode(engine):
    long_req = _req([5, 6, 7, 8], max_new_tokens=100, temperature=1.0, seed=1, ignore_eos=True)
    short_req = _req([9, 10], max_new_tokens=3, temperature=1.0, seed=2, ignore_eos=True)
    long_alone, short_alone = engine.submit(long_req).result(), engine.submit(short_req).result()

    steps0 = engine.stats["steps"]
    long_fut = engine.submit(long_req)
    while engine.stats["steps"] < steps0 + 5:  # the long one is decoding
        time.sleep(0.001)
    short = engine.submit(short_req).result()
    assert not long_fut.done()  # it joined a running batch and left it first
    assert short.output_ids == short_alone.output_ids
    assert long_fut.result().output_ids == long_alone.output_ids


def test_seed_gives_same_tokens_whatever_the_batch(engine):
    r = _req([11, 12, 13], max_new_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
    others = [_req(p, max_new_tokens=8, temperature=1.0, ignore_eos=True) for p in _prompts(3, engine.vocab_size, seed=5)]
    a = engine.generate_many([r] + others)[0]
    b = engine.generate_many(others[:1] + [r])[1]
    assert a.output_ids == b.output_ids


# ----------------------------------------------------------------------------- stop and caps


def test_stop_token_ends_generation_and_is_kept(engine):
    p = [5, 9, 14]
    free = engine.submit(_req(p, max_new_tokens=20, temperature=1.0, seed=9, ignore_eos=True)).result()
    stop = free.output_ids[4]
    first = free.output_ids.index(stop)
    c = engine.submit(_req(p, max_new_tokens=20, temperature=1.0, seed=9, ignore_eos=True, stop_token_ids=[stop])).result()
    assert c.output_ids == free.output_ids[: first + 1]
    assert c.finish_reason == "stop"
    assert c.prompt_tokens == 3


def test_eos_stops_unless_ignored(tmp_path, tiny_dir, engine):
    """The model's EOS (config.json / generation_config.json) ends generation like SGLang's."""
    import json
    import shutil

    assert engine.eos_token_ids == {read_hf_config(tiny_dir)["eos_token_id"]}
    p = [5, 9, 14]
    r = _req(p, max_new_tokens=20, temperature=1.0, seed=9, ignore_eos=True)
    free = engine.submit(r).result()
    # A copy of the model whose EOS is the token sampled at step 4.
    eos = free.output_ids[4]
    first = free.output_ids.index(eos)
    model = tmp_path / "eos_model"
    shutil.copytree(tiny_dir, model)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((model / name).read_text())
        cfg["eos_token_id"] = eos
        (model / name).write_text(json.dumps(cfg))
    eng = CpuEngine(model, max_batch_size=2, max_seq_len=128)
    try:
        stopped = eng.submit(_req(p, max_new_tokens=20, temperature=1.0, seed=9)).result()
        ignored = eng.submit(r).result()
    finally:
        eng.shutdown()
    assert (stopped.output_ids, stopped.finish_reason) == (free.output_ids[: first + 1], "stop")
    assert (ignored.output_ids, ignored.finish_reason) == (free.output_ids, "length")


def test_length_and_context_caps(tiny_dir):
    eng = CpuEngine(tiny_dir, max_batch_size=2, max_seq_len=16)
    try:
        c = eng.submit(_req([5] * 10, max_new_tokens=100, temperature=0.0, ignore_eos=True)).result()
        assert (len(c.output_ids), c.finish_reason) == (6, "length")  # 10 + 6 = max_seq_len
        c = eng.submit(_req([5] * 10, max_new_tokens=2, temperature=0.0, ignore_eos=True)).result()
        assert (len(c.output_ids), c.finish_reason) == (2, "length")
        c = eng.submit(_req([5] * 10, max_new_tokens=0)).result()
        assert (c.output_ids, c.finish_reason) == ([], "length")
        # A prompt that leaves no room is the caller's error; the engine keeps serving.
        with pytest.raises(EngineError, match="longer than the engine's context"):
            eng.submit(_req([5] * 16, max_new_tokens=1)).result()
        with pytest.raises(EngineError, match="outside the vocabulary"):
            eng.submit(_req([5, 10_000], max_new_tokens=1)).result()
        with pytest.raises(EngineError, match="longer than the engine's context"):
            eng.submit_score([5] * 17).result()
        assert eng.is_healthy()
        assert len(eng.submit(_req([5, 6], max_new_tokens=3, ignore_eos=True)).result().output_ids) == 3
    finally:
        eng.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        eng.submit(_req([5], max_new_tokens=1))


# ----------------------------------------------------------------------------- weights and protocol


def test_update_weights_changes_outputs_and_version(tmp_path, tiny_dir):
    other = make_tiny_model(tmp_path / "other", seed=7)
    eng = CpuEngine(tiny_dir, max_batch_size=2, max_seq_len=256)
    ref_other = CpuEngine(other, max_batch_size=2, max_seq_len=256)
    try:
        r = _req([5, 6, 7], max_new_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
        before = eng.submit(r).result()
        expected = ref_other.submit(r).result()
        # Near-uniform random models may sample the same tokens; their logprobs differ.
        assert (torch.tensor(before.output_logprobs) - torch.tensor(expected.output_logprobs)).abs().max() > 1e-3

        # In flight across the update: it keeps going, tagged with the version it started on.
        steps0 = eng.stats["steps"]
        long_fut = eng.submit(_req([5, 6], max_new_tokens=200, temperature=1.0, seed=0, ignore_eos=True))
        while eng.stats["steps"] < steps0 + 2:
            time.sleep(0.001)
        eng.load_weights(other, version=5)
        after = eng.submit(r).result()
        assert after.output_ids == expected.output_ids and after.weight_version == 5
        torch.testing.assert_close(torch.tensor(after.output_logprobs), torch.tensor(expected.output_logprobs), atol=1e-6, rtol=0)
        assert eng.current_weight_version() == 5
        inflight = long_fut.result()
        assert inflight.weight_version == 0 and len(inflight.output_ids) == 200

        with pytest.raises(EngineError, match="cannot load weights"):
            eng.load_weights(tmp_path / "missing", version=6)
        assert eng.current_weight_version() == 5
    finally:
        eng.shutdown()
        ref_other.shutdown()


def test_async_engine_protocol(engine):
    assert isinstance(engine, Engine)

    async def main():
        reqs = [_req(p, max_new_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i, p in enumerate(_prompts(6, engine.vocab_size, 3))]
        outs = await asyncio.gather(*(engine.generate(r) for r in reqs))
        scores = await engine.score([5, 6, 7, 8])
        return outs, scores, await engine.health(), await engine.weight_version()

    outs, scores, healthy, version = asyncio.run(main())
    assert all(isinstance(c, Completion) and len(c.output_ids) == 4 for c in outs)
    assert len(scores) == 4 and scores[0] == 0.0 and all(s < 0 for s in scores[1:])
    assert healthy and version == 0


def test_identical_prompts_are_prefilled_once(engine):
    """A group's completions of one prompt share its prefill; each still samples on its own."""
    p = [5, 6, 7, 8, 9]
    reqs = [_req(p, max_new_tokens=6, temperature=1.0, seed=200 + i, ignore_eos=True) for i in range(3)]
    reqs.append(_req([3, 4, 5], max_new_tokens=6, temperature=1.0, seed=300, ignore_eos=True))
    alone = [engine.submit(r).result() for r in reqs]
    prefills, tokens = engine.stats["prefills"], engine.stats["prefill_tokens"]
    together = engine.generate_many(reqs)  # arrive at once: one prefill of 4 slots
    assert engine.stats["prefills"] - prefills == 1
    assert engine.stats["prefill_tokens"] - tokens == 5 + 3
    for t, a in zip(together, alone, strict=True):
        assert t.output_ids == a.output_ids
        torch.testing.assert_close(torch.tensor(t.output_logprobs), torch.tensor(a.output_logprobs), atol=1e-5, rtol=0)
    assert len({tuple(c.output_ids) for c in together[:3]}) == 3  # the copies sample differently
    assert [c.cached_tokens for c in together] == [0, 5, 5, 0]


def test_a_prompt_already_running_is_not_prefilled_again(tiny_dir):
    # Its own engine with a long context: the long request must still be decoding when the
    # late one arrives, even on a loaded machine (about 2000 steps of margin).
    eng = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=2048)
    try:
        p = [21, 22, 23, 24, 25, 26]
        long_req = _req(p, max_new_tokens=2000, temperature=1.0, seed=7, ignore_eos=True)
        late_req = _req(p, max_new_tokens=5, temperature=1.0, seed=8, ignore_eos=True)
        late_alone = eng.submit(late_req).result()
        steps0 = eng.stats["steps"]
        long_fut = eng.submit(long_req)
        while eng.stats["steps"] < steps0 + 5:  # the long one is decoding
            time.sleep(0.001)
        tokens = eng.stats["prefill_tokens"]
        late = eng.submit(late_req).result()
        assert not long_fut.done()
        assert eng.stats["prefill_tokens"] == tokens  # its prompt came from the running slot
        assert late.cached_tokens == len(p)
        assert late.output_ids == late_alone.output_ids
        torch.testing.assert_close(torch.tensor(late.output_logprobs), torch.tensor(late_alone.output_logprobs),
                                   atol=1e-5, rtol=0)
        long_fut.cancel()
    finally:
        eng.shutdown()


def test_a_running_prompt_from_older_weights_is_computed_again(tiny_dir):
    eng = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128)
    try:
        p = [21, 22, 23, 24, 25, 26]
        steps0 = eng.stats["steps"]
        long_fut = eng.submit(_req(p, max_new_tokens=80, temperature=1.0, seed=7, ignore_eos=True))
        while eng.stats["steps"] < steps0 + 3:
            time.sleep(0.001)
        eng.submit_weights(read_safetensors(tiny_dir), version=1).result()
        tokens = eng.stats["prefill_tokens"]
        eng.submit(_req(p, max_new_tokens=3, temperature=1.0, seed=8, ignore_eos=True)).result()
        assert eng.stats["prefill_tokens"] == tokens + len(p)
        long_fut.result()
    finally:
        eng.shutdown()


def _multi_turn(eng, turns: int = 3, update_before: int | None = None, tiny_dir=None):
    """Three concurrent episodes: each turn's prompt is the last one + its reply + an
    observation; replies of different lengths, so sequences finish (and swap slots) apart."""
    base = list(range(4, 24))  # 20 tokens every episode starts with
    ctx = [base + [30 + i] for i in range(3)]
    turns_out = []
    for turn in range(turns):
        if turn == update_before:
            eng.submit_weights(read_safetensors(tiny_dir), version=turn).result()
        comps = eng.generate_many([_req(c, max_new_tokens=3 + 2 * i, temperature=1.0, seed=100 * turn + i, ignore_eos=True)
                                   for i, c in enumerate(ctx)])
        turns_out.append((ctx, comps))
        ctx = [c + comp.output_ids + [9, 10, 11] for c, comp in zip(ctx, comps, strict=True)]
    return turns_out


def test_prompts_of_one_batch_share_their_common_prefix(tiny_dir):
    """Two groups of prompts with their own 18-token prefix, and one that shares only 10 tokens
    (below ``min_prefix_reuse``): each group's first prompt is computed whole, the others from
    the end of the shared prefix; tokens and logprobs equal an engine that computes every
    prompt whole, and the prefill counts add up."""
    a, b = list(range(1, 19)), list(range(19, 37))  # the tiny model's vocabulary is 0..39
    prompts = [a + [37, 38], a + [39], b + [1, 2, 3], a + [5, 6, 7], b + [38], a[:10] + [39, 39]]
    reqs = [_req(p, max_new_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i, p in enumerate(prompts)]
    on = CpuEngine(tiny_dir, max_batch_size=8, max_seq_len=64, min_prefix_reuse=16)
    off = CpuEngine(tiny_dir, max_batch_size=8, max_seq_len=64, min_prefix_reuse=0)
    try:
        got, want = on.generate_many(reqs), off.generate_many(reqs)
        for x, y in zip(got, want, strict=True):
            assert x.output_ids == y.output_ids
            torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs), atol=1e-5, rtol=0)
        assert [c.cached_tokens for c in got] == [0, 18, 0, 18, 18, 0]
        assert [c.cached_tokens for c in want] == [0] * 6
        total = sum(len(p) for p in prompts)
        assert on.stats["prefill_tokens"] == total - 3 * 18 and on.stats["prefix_reused_tokens"] == 3 * 18
        assert off.stats["prefill_tokens"] == total
    finally:
        on.shutdown()
        off.shutdown()


def test_flush_cache_drops_the_kept_prefixes(tiny_dir):
    eng = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128, min_prefix_reuse=16)
    try:
        p = list(range(1, 21))
        first = eng.submit(_req(p, max_new_tokens=3, temperature=1.0, seed=1, ignore_eos=True)).result()
        turn = p + first.output_ids + [5, 6]
        assert eng.submit(_req(turn, max_new_tokens=3, temperature=1.0, seed=2, ignore_eos=True)).result().cached_tokens == 22
        # The turn continued in the slot its prefix was kept in: one finished sequence is kept.
        assert eng.flush_cache().result() == 1
        again = eng.submit(_req(turn + [7], max_new_tokens=3, temperature=1.0, seed=3, ignore_eos=True)).result()
        assert again.cached_tokens == 0
        assert eng.flush_cache().result() == 1
    finally:
        eng.shutdown()


def test_the_next_turn_continues_the_kept_prefix(tiny_dir):
    """Reuse on: a turn prefills only what its episode's finished sequence does not hold (the
    prompt, the reply but its last token, which was never fed), and tokens and logprobs equal
    an engine with reuse off; after a weight update nothing kept is reused."""
    on = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128, min_prefix_reuse=16)
    off = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128, min_prefix_reuse=0)
    try:
        got, want = _multi_turn(on), _multi_turn(off)
        for (ctx, a), (_, b) in zip(got, want, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.output_ids == y.output_ids
                torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs),
                                           atol=1e-5, rtol=0)
        # The first turn: the 20 tokens all episodes start with are computed once (in-batch
        # sharing), the two followers copy them from the leader.
        assert [c.cached_tokens for c in got[0][1]] == [0, 20, 20]
        for (prev_ctx, prev), (ctx, now) in zip(got, got[1:]):
            assert [c.cached_tokens for c in now] == [len(p) + len(c.output_ids) - 1 for p, c in zip(prev_ctx, prev)]
        assert all(c.cached_tokens == 0 for _, off_turn in want for c in off_turn)
        total = sum(len(c) for ctx, _ in want for c in ctx)
        assert off.stats["prefill_tokens"] == total and off.stats["prefix_reused_tokens"] == 0
        reused = sum(c.cached_tokens for _, comps in got for c in comps)
        assert on.stats["prefill_tokens"] == total - reused and on.stats["prefix_reused_tokens"] == reused > 0
        again = CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=128, min_prefix_reuse=16)
        try:
            after = _multi_turn(again, turns=2, update_before=1, tiny_dir=tiny_dir)
            # Only the in-batch share of the 20 base tokens: none of the longer kept prefixes.
            assert [c.cached_tokens for c in after[1][1]] == [0, 20, 20]
            assert [c.weight_version for c in after[1][1]] == [1, 1, 1]
        finally:
            again.shutdown()
    finally:
        on.shutdown()
        off.shutdown()
