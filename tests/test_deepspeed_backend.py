"""The DeepSpeed trainer backend on CPU (gloo, one process; one Ray test with two ranks).

Invariances checked: micro-batch 1 x 8 == 8 x 1 (and token packing), ZeRO-0 == ZeRO-2 ==
ZeRO-3, one rank == two ranks, and an interrupted run (save, load) == an uninterrupted one.
Optimizer settings in the update tests: AdamW's first step moves a weight by
``lr * g / (|g| + eps)``; with ``eps = 1e-3`` that is Lipschitz in ``g`` with constant
``lr / eps = 1``, so float noise in ``g`` (~1e-8) stays ~1e-8 in the weights, while a wrongly
scaled gradient (say 1/8 of it) moves weights by ~1e-4: the 1e-6 tolerance tells them apart.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from relayrl.config import OptimConfig, TrainerConfig
from relayrl.model import make_tiny_model
from relayrl.rl import deepspeed_backend
from relayrl.rl.backend import TrainerBackend
from relayrl.rl.deepspeed_backend import (
    DeepSpeedBackend,
    collate,
    gather_rows,
    plan_micro_batches,
    token_logprobs_and_entropy,
)

LENGTHS = [7, 12, 3, 9, 5, 11, 4, 8]
OPTIM = OptimConfig(lr=1e-3, eps=1e-3, grad_clip=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, intermediate_size=64)


def make_samples(lengths, seed=0, vocab=(8, 40)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(*vocab, (n,), generator=g)
        loss_mask = torch.zeros(n, dtype=torch.int64)
        loss_mask[min(2, n - 1) :] = 1  # a 2-token "prompt", then actions
        out.append({"tokens": tokens, "loss_mask": loss_mask})
    return out


def token_mean_nll(samples):
    """-mean log p over the action tokens of the whole batch (the global normaliser)."""
    n_tokens = sum(int(s["loss_mask"].sum()) for s in samples)

    def loss_fn(outputs, mb):
        mask = mb["loss_mask"].to(outputs["logprobs"].dtype)
        loss = -(outputs["logprobs"] * mask).sum() / n_tokens
        return loss, {"nll": loss.item()}

    return loss_fn


def backend(path, stage=0, mbs=8, max_tokens=None, optim=OPTIM, role="policy", **kw):
    cfg = TrainerConfig(zero_stage=stage, micro_batch_size=mbs, max_tokens_per_micro_batch=max_tokens)
    return DeepSpeedBackend(role, path, cfg, optim, **kw)


def weights(b):
    return b.state_dict_for_engine()


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- pure helpers


def test_plan_micro_batches_by_count_and_by_tokens():
    lengths = [3, 10, 5, 10, 2]
    # Longest first, stable: order 1, 3, 2, 0, 4.
    assert plan_micro_batches(lengths, 2) == [[1, 3], [2, 0], [4]]
    # Budget 20 tokens, padded size = count * longest: [10,10] = 20; [5,3,2] = 15; nothing else fits.
    assert plan_micro_batches(lengths, 1, max_tokens_per_micro_batch=20) == [[1, 3], [2, 0, 4]]
    # A sample longer than the budget gets a micro-batch of its own.
    assert plan_micro_batches([40, 3], 8, max_tokens_per_micro_batch=16) == [[0], [1]]


def test_collate_right_pads_with_zeros():
    mb = collate([{"tokens": torch.tensor([5, 6, 7]), "adv": torch.tensor([0.5, 1.0, 2.0])},
                  {"tokens": torch.tensor([9]), "adv": torch.tensor([3.0])}])
    assert mb["tokens"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert mb["adv"].tolist() == [[0.5, 1.0, 2.0], [3.0, 0.0, 0.0]]
    assert mb["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="one value per token"):
        collate([{"tokens": torch.tensor([1, 2]), "adv": torch.tensor([1.0])}])


def test_token_logprobs_and_entropy_hand_worked():
    # Vocabulary of 2. Position 0 predicts token 1 with logits [0, ln 3]: p = [1/4, 3/4].
    # Position 1 predicts token 0 with logits [ln 2, 0]: p = [2/3, 1/3]. Position 2 predicts nothing.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [5.0, -5.0]]])
    tokens = torch.tensor([[1, 1, 0]])
    lp, ent = token_logprobs_and_entropy(logits, tokens)
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    assert lp[0].tolist() == pytest.approx([0.0, math.log(3 / 4), math.log(2 / 3)], abs=1e-6)
    assert ent[0].tolist() == pytest.approx([0.0, h(1 / 4, 3 / 4), h(2 / 3, 1 / 3)], abs=1e-6)
    # Temperature 2 halves the logits: [0, ln 3 / 2] gives p(1) = sqrt 3 / (1 + sqrt 3).
    lp2, _ = token_logprobs_and_entropy(logits, tokens, temperature=2.0)
    assert lp2[0, 1].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def test_token_logprobs_chunked_equals_direct_with_grad(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    weights_lp, weights_ent = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    def direct():
        logp = torch.log_softmax(logits.float() / 0.7, -1)
        lp = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        pad = torch.zeros(3, 1)
        return torch.cat([pad, lp], 1), torch.cat([pad, ent], 1)

    ref_lp, ref_ent = direct()
    (ref_grad,) = torch.autograd.grad((ref_lp * weights_lp).sum() + (ref_ent * weights_ent).sum(), logits)
    monkeypatch.setattr(deepspeed_backend, "_CHUNK_BYTES", 4 * 11 * 4)  # 4 rows per chunk: 4 chunks of 15 rows
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    (grad,) = torch.autograd.grad((lp * weights_lp).sum() + (ent * weights_ent).sum(), logits)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_gather_rows_equals_indexing_and_sums_repeated_rows_in_order():
    # Hand-worked: rows 0 and 2 of x; row 0 taken three times.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    rows = torch.tensor([[0, 2], [0, 0]])
    out = gather_rows(x, rows)
    assert out.tolist() == [[[1.0, 2.0], [5.0, 6.0]], [[1.0, 2.0], [1.0, 2.0]]]
    out.backward(torch.tensor([[[1.0, 10.0], [2.0, 20.0]], [[3.0, 30.0], [4.0, 40.0]]]))
    assert x.grad.tolist() == [[8.0, 80.0], [0.0, 0.0], [2.0, 20.0]]
    # Large, with repeats (a shared prompt's last row and padding): the same values as
    # indexing, and each row's gradient the sum of its copies' in the order of rows.reshape(-1).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 300, generator=g, requires_grad=True)
    rows = torch.randint(1, 50, (4, 64), generator=g)
    rows[:, 0] = 0
    rows[2:, 40:] = 0
    upstream = torch.randn(4, 64, 300, generator=g)
    assert torch.equal(gather_rows(x, rows), x[rows])
    (grad,) = torch.autograd.grad((gather_rows(x, rows) * upstream).sum(), x)
    (ref,) = torch.autograd.grad((x[rows] * upstream).sum(), x)
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-5)
    flat, up = rows.reshape(-1).tolist(), upstream.reshape(-1, 300)
    in_order = torch.zeros(50, 300)
    for i, r in enumerate(flat):
        in_order[r] = in_order[r] + up[i]
    assert torch.equal(grad, in_order)


# ----------------------------------------------------------------------------- the backend


def test_forward_logprobs_equals_hand_computation_from_hf_logits(tiny):
    b = backend(tiny, stage=2, mbs=3)
    assert isinstance(b, TrainerBackend)
    samples = make_samples(LENGTHS)
    got = b.forward_logprobs(samples, temperature=0.7)
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    for s, lp in zip(samples, got, strict=True):
        with torch.no_grad():
            logits = hf(input_ids=s["tokens"][None]).logits[0]  # one unpadded sequence
        logp = torch.log_softmax(logits / 0.7, -1)
        want = torch.zeros(len(s["tokens"]))
        for i in range(1, len(s["tokens"])):
            want[i] = logp[i - 1, s["tokens"][i]]
        assert lp.shape == s["tokens"].shape and lp.dtype == torch.float32
        # Every micro-batch's first action is at position 2: the prompt's positions are not scored.
        assert lp[:2].tolist() == [0.0, 0.0]
        torch.testing.assert_close(lp[2:], want[2:], atol=2e-6, rtol=0)


def test_policy_forward_scores_from_the_first_action_on(tiny):
    """The LM head runs from the first position any action of the micro-batch needs; the
    logprobs there equal a full forward's, observations after it included, and a sample
    without a loss_mask is scored everywhere."""
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)

    def full(tokens):
        with torch.no_grad():
            lp, _ = token_logprobs_and_entropy(hf(input_ids=tokens[None]).logits, tokens[None])
        return lp[0]

    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(8, 40, (n,), generator=g) for n in (9, 12, 6)]
    masks = [torch.tensor(m) for m in ([0, 0, 0, 0, 1, 1, 0, 0, 1], [0] * 6 + [1] * 6, [0, 0, 0, 1, 1, 1])]
    samples = [{"tokens": t, "loss_mask": m} for t, m in zip(tokens, masks)]
    b = backend(tiny, mbs=3)
    got = b.forward_logprobs(samples)  # one micro-batch; its first action is at position 3
    for t, lp in zip(tokens, got, strict=True):
        want = full(t)
        assert lp[:3].tolist() == [0.0, 0.0, 0.0]
        torch.testing.assert_close(lp[3:], want[3:], atol=2e-6, rtol=0)  # observations at 6-7 too
    for t, lp in zip(tokens, b.forward_logprobs([{"tokens": t} for t in tokens]), strict=True):
        torch.testing.assert_close(lp, full(t), atol=2e-6, rtol=0)


def _two_steps(tiny, stage, mbs, max_tokens=None, grad_ckpt=False):
    """Two optimizer steps of different sizes (8 then 5 sequences); weights and metrics."""
    cfg = TrainerConfig(zero_stage=stage, micro_batch_size=mbs, max_tokens_per_micro_batch=max_tokens, gradient_checkpointing=grad_ckpt)
    b = DeepSpeedBackend("policy", tiny, cfg, OPTIM)
    s1, s2 = make_samples(LENGTHS, seed=1), make_samples(LENGTHS[:5], seed=2)
    m1 = b.train_step(s1, token_mean_nll(s1))
    m2 = b.train_step(s2, token_mean_nll(s2))
    return weights(b), (m1, m2)


@pytest.fixture(scope="module")
def reference_run(tiny):
    return _two_steps(tiny, stage=0, mbs=8)


@pytest.mark.parametrize(
    "stage,mbs,max_tokens,grad_ckpt",
    [(0, 1, None, False), (2, 3, None, False), (2, 8, None, False), (3, 1, None, False), (0, 8, 24, False), (3, 3, None, True)],
    ids=["zero0-mb1", "zero2-mb3", "zero2-mb8", "zero3-mb1", "zero0-tokens24", "zero3-mb3-gradckpt"],
)
def test_update_is_invariant_to_micro_batching_and_zero_stage(tiny, reference_run, stage, mbs, max_tokens, grad_ckpt):
    ref_w, (ref1, ref2) = reference_run
    w, (m1, m2) = _two_steps(tiny, stage, mbs, max_tokens, grad_ckpt)
    init = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    assert max_diff(ref_w, init) > 5e-4  # training moved the weights
    assert max_diff(w, ref_w) < 1e-6
    for m, ref in ((m1, ref1), (m2, ref2)):
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
        assert m["nll"] == pytest.approx(ref["nll"], rel=1e-6)
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    expected_mb = {1: 8, 3: 3, 8: 1}[mbs] if max_tokens is None else None
    if expected_mb is not None:
        assert m1["num_micro_batches"] == expected_mb


def test_tied_embedding_lookup_has_a_sparse_gradient_and_the_same_update(tiny):
    """Without ZeRO the tied embedding's lookup adds a sparse gradient into the LM head's dense
    one: the same update as the dense lookup (ZeRO-2 keeps it dense, and the invariance test
    above holds the two equal too)."""
    from relayrl.rl.deepspeed_backend import _tied_input_embedding

    runs = {}
    for sparse in (True, False):
        b = backend(tiny, stage=0, mbs=3)
        emb = _tied_input_embedding(b.module)
        assert emb is not None and emb.sparse is True
        emb.sparse = sparse
        s1 = make_samples(LENGTHS, seed=1)
        m = b.train_step(s1, token_mean_nll(s1))
        runs[sparse] = (weights(b), m["grad_norm"])
    assert max_diff(runs[True][0], runs[False][0]) < 1e-7
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-7)
    assert _tied_input_embedding(backend(tiny, stage=2).module).sparse is False
    assert _tied_input_embedding(backend(tiny, role="reference").module).sparse is False


def test_adam_state_made_at_set_up_gives_the_same_updates_as_lazy_state():
    """``materialize_adam_state`` creates what AdamW's first step would (step 0, zero moments):
    the same parameters bit for bit after three steps, with weight decay and AMSGrad."""
    from relayrl.rl.deepspeed_backend import materialize_adam_state

    for amsgrad in (False, True):
        runs = []
        for eager in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
            model[0].bias.requires_grad_(False)  # a frozen parameter gets no state either way
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
            if eager:
                materialize_adam_state(opt)
                st = opt.state[model[0].weight]
                assert float(st["step"]) == 0.0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
                assert ("max_exp_avg_sq" in st) == amsgrad and model[0].bias not in opt.state
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
            for _ in range(3):
                opt.zero_grad()
                model(x).square().sum().backward()
                opt.step()
            runs.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)), amsgrad
    with pytest.raises(TypeError, match="SGD"):
        materialize_adam_state(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))


def test_grad_clip_and_warmup(tiny):
    # eps = 1 puts AdamW's first step in its near-linear regime, update = lr * g / (|g| + 1), so
    # the clip shows in the weights. Clipping to norm 0.5 must equal an unclipped run on the loss
    # scaled by hand by 0.5 / grad_norm; without the clip the update would be 2x larger or more.
    samples = make_samples(LENGTHS)
    base = token_mean_nll(samples)
    init = weights(backend(tiny))
    clipped = backend(tiny, optim=OptimConfig(lr=0.1, eps=1.0, grad_clip=0.5, warmup_steps=4))
    m = clipped.train_step(samples, base)
    assert m["lr"] == pytest.approx(0.1 / 4)  # step 0 of a 4-step warm-up: lr * 1/4
    assert m["grad_norm"] > 1.0  # the clip is active and halves the gradient at least
    scale = 0.5 / m["grad_norm"]
    scaled = backend(tiny, optim=OptimConfig(lr=0.1 / 4, eps=1.0, grad_clip=None))
    m_scaled = scaled.train_step(samples, lambda o, mb: (base(o, mb)[0] * scale, {}))
    assert m_scaled["grad_norm"] == pytest.approx(0.5, rel=1e-5)
    assert max_diff(weights(clipped), init) > 1e-4
    assert max_diff(weights(clipped), weights(scaled)) < 1e-6
    m2 = clipped.train_step(samples, base)
    assert m2["lr"] == pytest.approx(0.1 * 2 / 4)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_save_then_load_resumes_bit_identically(tiny, tmp_path, stage):
    optim = OptimConfig(lr=1e-3, warmup_steps=3, weight_decay=0.1)
    steps = [make_samples(LENGTHS[: 8 - k], seed=10 + k) for k in range(3)]
    a = backend(tiny, stage=stage, mbs=3, optim=optim)
    for s in steps[:2]:
        a.train_step(s, token_mean_nll(s))
    a.save(tmp_path / "ckpt")
    rng_after_save = torch.rand(4)
    m_a = a.train_step(steps[2], token_mean_nll(steps[2]))
    w1 = weights(a)

    b = backend(tiny, stage=stage, mbs=3, optim=optim, seed=123)
    b.load(tmp_path / "ckpt")
    assert torch.equal(torch.rand(4), rng_after_save)  # RNG streams restored
    assert b.global_step == 2
    m_b = b.train_step(steps[2], token_mean_nll(steps[2]))
    w2 = weights(b)
    assert m_b["lr"] == m_a["lr"] == pytest.approx(1e-3)  # warm-up finished at step 3
    assert m_b["grad_norm"] == m_a["grad_norm"]
    assert max_diff(w1, w2) == 0.0
    # The saved hf/ directory is a plain checkpoint of the step-2 weights.
    assert (tmp_path / "ckpt" / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("own", [True, False])
def test_weights_do_not_follow_the_checkpoint_file_written_in_place(tiny, tmp_path, monkeypatch, own):
    """The trainer's weights are its own: the model file rewritten in place after set-up (same
    size, other values) does not change them. Without ``own_parameter_memory`` they are views of
    the file's private memory map, whose unwritten pages show the new bytes (Linux)."""
    import shutil

    if not own:
        monkeypatch.setattr(deepspeed_backend, "own_parameter_memory", lambda model: None)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny, model_dir)
    b = backend(str(model_dir))
    before = {k: v.clone() for k, v in weights(b).items()}
    (f,) = model_dir.glob("*.safetensors")
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with open(f, "r+b") as fh:  # in place: same inode, same pages
        fh.seek(header)
        fh.write(b"\x00" * (f.stat().st_size - header))
    changed = max_diff(weights(b), before)
    if own:
        assert changed == 0.0
    else:  # the hazard the copy removes: this platform maps the file and shows the write
        assert changed > 0.0


def test_incomplete_or_occupied_checkpoint_paths_are_refused(tiny, tmp_path):
    b = backend(tiny, stage=0)
    partial = tmp_path / ".ckpt.partial"  # what a save killed before its rename leaves
    partial.mkdir()
    (partial / "rng_rank0.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a complete backend checkpoint"):
        b.load(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a complete backend checkpoint"):
        b.load(partial)
    b.save(tmp_path / "ckpt")  # clears the stale partial directory
    assert not partial.exists()
    with pytest.raises(FileExistsError):
        b.save(tmp_path / "ckpt")
    critic = backend(tiny, stage=0, role="critic")
    with pytest.raises(ValueError, match="role"):
        critic.load(tmp_path / "ckpt")


@pytest.mark.parametrize("stage", [0, 3])
def test_state_dict_for_engine_and_export_hf_round_trip(tiny, tmp_path, stage):
    hf_init = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    b = backend(tiny, stage=stage, mbs=4)
    sd = b.state_dict_for_engine()
    want = hf_init.state_dict()
    assert list(sd) == sorted(want)  # HF names, lm_head.weight (tied) included
    for k, v in sd.items():
        assert v.device.type == "cpu" and v.is_contiguous() and v.shape == want[k].shape
        assert torch.equal(v, want[k])

    samples = make_samples(LENGTHS)
    b.train_step(samples, token_mean_nll(samples))
    b.export_hf(tmp_path / "export")
    b.export_hf(tmp_path / "export")  # a second export replaces the first
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    trained = b.state_dict_for_engine()
    assert max_diff(trained, reloaded.state_dict()) == 0.0
    # copy=False (what export_hf uses): the same values; without ZeRO-3 the parameters themselves.
    shared = b.state_dict_for_engine(copy=False)
    assert max_diff(trained, shared) == 0.0
    params = {p.data_ptr() for p in b.engine.module.parameters()}
    assert all((v.data_ptr() in params) == (stage != 3) for v in shared.values()), stage
    assert max_diff(trained, want) > 1e-4
    got = b.forward_logprobs(samples)
    with torch.no_grad():
        for s, lp in zip(samples, got, strict=True):
            logits = reloaded(input_ids=s["tokens"][None]).logits
            want_lp, _ = token_logprobs_and_entropy(logits, s["tokens"][None])
            torch.testing.assert_close(lp[2:], want_lp[0, 2:], atol=2e-6, rtol=0)  # from the first action on
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "export").encode("w1 w2") == AutoTokenizer.from_pretrained(tiny).encode("w1 w2")

    # A hand-off (durable=False) over an earlier one: the same files, rewritten in place.
    handoff = tmp_path / "handoff"
    b.export_hf(handoff, durable=False)  # the first: a new directory
    (weights_file,) = handoff.glob("*.safetensors")
    inode = weights_file.stat().st_ino
    b.train_step(samples, token_mean_nll(samples))
    b.export_hf(handoff, durable=False)
    assert weights_file.stat().st_ino == inode
    again = AutoModelForCausalLM.from_pretrained(handoff, dtype=torch.float32)
    assert max_diff(b.state_dict_for_engine(), again.state_dict()) == 0.0
    assert max_diff(b.state_dict_for_engine(), trained) > 1e-4


@pytest.mark.parametrize("stage", [0, 3])
def test_reference_save_load_restores_its_weights(tiny, tmp_path, stage):
    other = make_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64, seed=1)
    a = backend(tiny, stage=stage, role="reference")
    a.save(tmp_path / "ref")
    b = backend(other, stage=stage, role="reference")
    samples = make_samples(LENGTHS[:3])
    want = a.forward_logprobs(samples)
    assert max((x - y).abs().max().item() for x, y in zip(b.forward_logprobs(samples), want)) > 1e-2
    b.load(tmp_path / "ref")
    for x, y in zip(b.forward_logprobs(samples), want, strict=True):
        assert torch.equal(x, y)


def test_reference_is_frozen_and_scores_like_the_policy(tiny):
    ref = backend(tiny, stage=2, role="reference")
    pol = backend(tiny, stage=2)
    samples = make_samples(LENGTHS[:3])
    for a, b in zip(ref.forward_logprobs(samples), pol.forward_logprobs(samples), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="frozen"):
        ref.train_step(samples, token_mean_nll(samples))
    with pytest.raises(ValueError, match="critic"):
        pol.forward_values(samples)


@pytest.mark.slow
def test_two_ranks_through_ray_equal_one_rank(tiny, tmp_path):
    import ray

    from relayrl.rl.trainer_actor import TrainerGroup, shard_by_tokens

    # Hand-worked sharding: longest first, each to the lighter rank (ties to rank 0):
    # 12->r0 [12,0]; 11->r1 [12,11]; 9->r1 [12,20]; 8->r0 [20,20]; 7->r0 [27,20]; 5->r1 [27,25];
    # 4->r1 [27,29]; 3->r0 [30,29]. Indices: r0 = {1,7,0,2}, r1 = {5,3,4,6}.
    assert shard_by_tokens(LENGTHS, 2) == [[0, 1, 2, 7], [3, 4, 5, 6]]
    cfg = TrainerConfig(zero_stage=2, micro_batch_size=2)
    # Step 2 (5 samples) gives rank 0 one micro-batch and rank 1 two; step 3 (one sample) gives
    # rank 1 none: the short rank runs zero-loss passes to stay in the collectives.
    steps = [make_samples(LENGTHS, seed=1), make_samples(LENGTHS[:5], seed=2), make_samples([6], seed=3)]
    one = DeepSpeedBackend("policy", tiny, cfg, OPTIM)
    want_lp = one.forward_logprobs(steps[0])
    want = [one.train_step(s, token_mean_nll(s)) for s in steps]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        group = TrainerGroup("policy", str(tiny), cfg, OPTIM, world_size=2)
        assert isinstance(group, TrainerBackend)
        for a, b in zip(group.forward_logprobs(steps[0]), want_lp, strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
        got = [group.train_step(s, token_mean_nll(s)) for s in steps[:2]]
        group.save(str(tmp_path / "ckpt"))
        got.append(group.train_step(steps[2], token_mean_nll(steps[2])))
        for m, ref in zip(got, want, strict=True):
            assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
            assert m["nll"] == pytest.approx(ref["nll"], rel=1e-6)
        w1 = group.state_dict_for_engine()
        assert max_diff(w1, weights(one)) < 1e-6
        group.load(str(tmp_path / "ckpt"))
        group.train_step(steps[2], token_mean_nll(steps[2]))
        assert max_diff(group.state_dict_for_engine(), w1) == 0.0
        group.shutdown()
    finally:
        if started:
            ray.shutdown()


def test_old_logprobs_from_the_training_forward_equal_a_recompute(tiny):
    """algorithm.old_logprobs=auto skips the no-grad pass before a single-update step: the
    update must equal the one made with recomputed old logprobs."""
    from relayrl.config import AlgorithmConfig
    from relayrl.rl.ppo import make_policy_loss_fn

    samples = make_samples(LENGTHS, seed=4)
    g = torch.Generator().manual_seed(5)
    for s in samples:
        s["advantages"] = torch.randn(len(s["tokens"]), generator=g) * s["loss_mask"]
    n = sum(int(s["loss_mask"].sum()) for s in samples)
    alg = AlgorithmConfig()
    recompute, fast = backend(tiny, mbs=3), backend(tiny, mbs=3)
    for s, lp in zip(samples, recompute.forward_logprobs(samples), strict=True):
        s["old_logprobs"] = lp * s["loss_mask"]
    m_ref = recompute.train_step(samples, make_policy_loss_fn(alg, n, len(samples)))
    plain = [{k: v for k, v in s.items() if k != "old_logprobs"} for s in samples]
    m = fast.train_step(plain, make_policy_loss_fn(alg, n, len(samples), old_from_forward=True))
    assert max_diff(weights(fast), weights(recompute)) < 1e-6
    assert max_diff(weights(fast), AutoModelForCausalLM.from_pretrained(tiny).state_dict()) > 1e-4
    assert m["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-12) and m_ref["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_zero_stage_auto_is_0_on_one_fp32_rank_and_2_otherwise(tiny):
    auto = TrainerConfig(micro_batch_size=2)
    assert auto.zero_stage == "auto"
    assert DeepSpeedBackend("policy", tiny, auto, OPTIM).zero_stage == 0
    assert DeepSpeedBackend("policy", tiny, auto, OPTIM, dtype="bfloat16").zero_stage == 2
    assert DeepSpeedBackend("policy", tiny, TrainerConfig(zero_stage=2), OPTIM).zero_stage == 2


# ----------------------------------------------------------------------------- shared prompts


def grouped_samples(seed=6, prompt_lens=(20, 18), group=4, vocab=(8, 40)):
    """GRPO-like groups: `group` completions of each prompt (a 3-token observation inside some)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in prompt_lens:
        prompt = torch.randint(*vocab, (p,), generator=g)
        for j in range(group):
            n = int(torch.randint(3, 9, (1,), generator=g))
            suffix = torch.randint(*vocab, (n,), generator=g)
            mask = torch.ones(n, dtype=torch.int64)
            if j % 2:
                mask[1:4] = 0
            out.append({"tokens": torch.cat([prompt, suffix]),
                        "loss_mask": torch.cat([torch.zeros(p, dtype=torch.int64), mask])})
    # A loner: no other sample has its prompt.
    out.append({"tokens": torch.randint(*vocab, (9,), generator=g), "loss_mask": torch.tensor([0] * 4 + [1] * 5)})
    return out


def test_plan_shared_prompts_groups_by_prompt_and_respects_the_sizes():
    s = grouped_samples()
    plan = deepspeed_backend.plan_shared_prompts(s, micro_batch_size=3)
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(s)))
    shared = [(sorted(idx), n) for idx, n in plan if n]
    # Groups of 4 cut into 3 + 1 (longest first); the single leftovers join the ordinary plan.
    assert [n for _, n in shared] == [20, 18] and all(len(idx) == 3 for idx, _ in shared)
    assert all(set(idx) <= set(range(4)) for idx, n in shared if n == 20)
    assert sum(len(idx) for idx, n in plan if n == 0) == 3
    # Enough to spare or not: pairs spare (2 - 1) * 20 < 32 tokens; groups of 4 spare 3 * 18 >= 32.
    assert [n for _, n in deepspeed_backend.plan_shared_prompts(s, 2, min_shared_tokens=32) if n] == []
    assert [n for _, n in deepspeed_backend.plan_shared_prompts(s, 4, min_shared_tokens=32) if n] == [20, 18]
    # By tokens: a shared row (the prompt once, then the suffixes) stays within the budget.
    by_tokens = deepspeed_backend.plan_shared_prompts(s, 8, max_tokens_per_micro_batch=36)
    rows = [n + sum(len(s[i]["tokens"]) - n for i in idx) for idx, n in by_tokens if n]
    assert rows and max(rows) <= 36
    # The row's extra attention counts against it. 4 suffixes of 40 after a 17-token prompt spare
    # 3 * 17 = 51 tokens, and the row computes (17 + 160)^2 - 4 * 57^2 = 18333 more pairs.
    long = [{"tokens": torch.cat([torch.arange(17), torch.full((40,), 30 + j)]),
             "loss_mask": torch.cat([torch.zeros(17), torch.ones(40)])} for j in range(4)]
    assert [n for _, n in deepspeed_backend.plan_shared_prompts(long, 4, attention_cost=1e-2) if n] == []  # 51 - 183
    assert [n for _, n in deepspeed_backend.plan_shared_prompts(long, 4, attention_cost=1e-4) if n] == [17]  # 51 - 2
    # No loss mask, no sharing.
    bare = [{"tokens": x["tokens"]} for x in s]
    assert all(n == 0 for _, n in deepspeed_backend.plan_shared_prompts(bare, 4))


@pytest.mark.parametrize("stage,grad_ckpt", [(0, False), (3, False), (2, True)], ids=["zero0", "zero3", "zero2-gradckpt"])
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_shared_prompts_equal_separate_sequences(tiny, stage, grad_ckpt, role):
    """The shared-prompt forward is a fast path of the ordinary one: the same outputs, and
    one optimizer step on the same batch gives the same weights."""
    samples = grouped_samples()
    n = sum(int(s["loss_mask"].sum()) for s in samples)

    def make(share):
        cfg = TrainerConfig(zero_stage=stage, micro_batch_size=4, share_prompts=share, gradient_checkpointing=grad_ckpt)
        return DeepSpeedBackend(role, tiny, cfg, OPTIM, seed=3)

    fast, ref = make(True), make(False)
    assert fast._shares_prompts and not ref._shares_prompts
    assert any(p for _, p in fast._plan(samples))
    if role == "policy":
        for a, b, s in zip(fast.forward_logprobs(samples), ref.forward_logprobs(samples), samples, strict=True):
            m = s["loss_mask"].bool()
            torch.testing.assert_close(a[m], b[m], atol=2e-6, rtol=0)
        nll = token_mean_nll(samples)

        def loss_fn(outputs, mb):  # with an entropy term: its values and gradient must agree too
            loss, metrics = nll(outputs, mb)
            ent = (outputs["entropy"] * mb["loss_mask"]).sum() / n
            return loss - 0.1 * ent, {"nll": metrics["nll"], "entropy": ent.item()}
    else:
        for a, b in zip(fast.forward_values(samples), ref.forward_values(samples), strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=0)

        def loss_fn(outputs, mb):
            mask = mb["loss_mask"].to(outputs["values"].dtype)
            loss = ((outputs["values"] - 1.0) ** 2 * mask).sum() / n
            return loss, {"nll": loss.item()}
    before = {k: v.clone() for k, v in fast.engine.module.state_dict().items()}
    m_fast, m_ref = fast.train_step(samples, loss_fn), ref.train_step(samples, loss_fn)
    assert max_diff(fast.engine.module.state_dict(), before) > 1e-4  # the step moved the weights
    assert m_fast["nll"] == pytest.approx(m_ref["nll"], rel=1e-6)
    if role == "policy":
        assert m_fast["entropy"] == pytest.approx(m_ref["entropy"], rel=1e-6)
    assert m_fast["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-5)
    assert m_fast["num_micro_batches"] == m_ref["num_micro_batches"] == 3
    assert max_diff(weights(fast) if role == "policy" else fast.engine.module.state_dict(),
                    weights(ref) if role == "policy" else ref.engine.module.state_dict()) < 1e-6
