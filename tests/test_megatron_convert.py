"""HF <-> Megatron weight conversion: exact round trips (Llama tied/untied, Qwen2 with qkv bias,
Qwen3 with qk-norm and a head_dim that is not hidden/heads) at TP 1, 2 and 4 and through PP=2
stages, the layouts worked by hand on tiny tensors, and the options that have no mapping. No
megatron-core needed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from relayrl.rl.megatron_convert import (
    ArchSpec,
    UnsupportedModel,
    arch_from_hf_config,
    check_pp,
    check_tp,
    from_te_names,
    hf_to_megatron,
    megatron_to_hf,
    to_te_names,
)

SMALL = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


def random_hf_state(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    # Random norm weights (HF initialises them to 1, which would hide a swapped norm).
    return {k: (torch.randn_like(v) if "norm" in k else v) for k, v in state.items()}


CONFIGS = {
    "llama_tied": LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama_untied": LlamaConfig(**SMALL, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3": Qwen3Config(**SMALL, head_dim=8, tie_word_embeddings=True),  # 8 heads x 8 != 32
}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name, tp):
    config = CONFIGS[name]
    spec = arch_from_hf_config(config)
    hf = random_hf_state(config)
    shards = [hf_to_megatron(hf, spec, tp, r) for r in range(tp)]
    back = megatron_to_hf(shards, spec)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # Every shard holds 1/tp of each split weight.
    for k in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc1.weight"):
        assert shards[0][k].shape[0] * tp == hf_to_megatron(hf, spec, 1, 0)[k].shape[0]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_through_pipeline_stages_is_exact(name, tp):
    config = CONFIGS[name]
    spec = arch_from_hf_config(config)
    hf = random_hf_state(config)
    stages = [[hf_to_megatron(hf, spec, tp, r, pp_size=2, pp_rank=p) for r in range(tp)] for p in range(2)]
    back = megatron_to_hf(stages, spec)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # Each stage holds one of the two layers, numbered 0 there; HF layer 1 is stage 1's layer 0.
    whole = hf_to_megatron(hf, spec, tp, 0)
    first, last = stages[0][0], stages[1][0]
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"0"}
    key = "self_attention.linear_qkv.weight"
    assert torch.equal(last[f"decoder.layers.0.{key}"], whole[f"decoder.layers.1.{key}"])
    assert torch.equal(first[f"decoder.layers.0.{key}"], whole[f"decoder.layers.0.{key}"])
    # The embedding on the first stage, the final norm and output layer on the last; a tied
    # model's last stage keeps its own copy of the embedding as the output layer (megatron-core's).
    assert "embedding.word_embeddings.weight" in first and "embedding.word_embeddings.weight" not in last
    assert "decoder.final_layernorm.weight" in last and "decoder.final_layernorm.weight" not in first
    assert "output_layer.weight" not in first
    expected_out = whole["embedding.word_embeddings.weight"] if spec.tie_word_embeddings else whole["output_layer.weight"]
    assert torch.equal(last["output_layer.weight"], expected_out)


@pytest.mark.parametrize("pp", [2, 4])
def test_four_layers_over_stages(pp):
    """Four layers: PP 2 gives two a stage, PP 4 one, and its middle stages hold only layers."""
    config = LlamaConfig(**(SMALL | {"num_hidden_layers": 4}), tie_word_embeddings=True)
    spec = arch_from_hf_config(config)
    hf = random_hf_state(config)
    stages = [[hf_to_megatron(hf, spec, pp_size=pp, pp_rank=p)] for p in range(pp)]
    per = 4 // pp
    for p, (stage,) in enumerate(stages):
        layer_keys = {k for k in stage if k.startswith("decoder.layers.")}
        assert {int(k.split(".")[2]) for k in layer_keys} == set(range(per))
        assert len(stage) - len(layer_keys) == {0: 1, pp - 1: 2}.get(p, 0)  # embedding; final norm + output
        # Stage p's layer j is HF layer p * per + j.
        assert torch.equal(stage["decoder.layers.0.pre_mlp_layernorm.weight"],
                           hf[f"model.layers.{p * per}.post_attention_layernorm.weight"])
    back = megatron_to_hf(stages, spec)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_critic_through_pipeline_stages():
    spec = arch_from_hf_config(CONFIGS["llama_tied"])
    hf = {k: v for k, v in random_hf_state(CONFIGS["llama_tied"]).items() if k != "lm_head.weight"}
    hf |= {"score.weight": torch.randn(1, 32), "score.bias": torch.randn(1)}
    stages = [[hf_to_megatron(hf, spec, role="critic", pp_size=2, pp_rank=p)] for p in range(2)]
    assert "value_head.weight" in stages[1][0] and "output_layer.weight" not in stages[1][0]
    back = megatron_to_hf(stages, spec, role="critic")
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_pp_must_divide_layers():
    spec = arch_from_hf_config(CONFIGS["llama_tied"])  # 2 layers
    check_pp(spec, 2)  # fits: no error
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 does not divide the model's num_hidden_layers \(2\)"):
        check_pp(spec, 3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 does not divide"):
        hf_to_megatron(random_hf_state(CONFIGS["llama_tied"]), spec, pp_size=4, pp_rank=0)


def test_family_options_are_read():
    q2, q3, ll = (arch_from_hf_config(CONFIGS[n]) for n in ("qwen2", "qwen3", "llama_tied"))
    assert (q2.qkv_bias, q2.qk_norm) == (True, False)
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim) == (False, True, 8)
    assert (ll.qkv_bias, ll.qk_norm, ll.head_dim, ll.tie_word_embeddings) == (False, False, 4, True)
    qwen2 = hf_to_megatron(random_hf_state(CONFIGS["qwen2"]), q2)
    assert qwen2["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((8 + 2 * 4) * 4,)
    qwen3 = hf_to_megatron(random_hf_state(CONFIGS["qwen3"]), q3)
    assert qwen3["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (8,)
    assert "output_layer.weight" not in qwen3  # tied


def _hand_spec():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 2, MLP 4: every row is one named number.
    return ArchSpec(family="llama", vocab_size=5, hidden_size=2, ffn_hidden_size=4, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=1, norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=8,
                    tie_word_embeddings=False, qkv_bias=False, qk_norm=False)


def _hand_hf(spec):
    col = lambda *vals: torch.tensor(vals, dtype=torch.float32)[:, None].repeat(1, spec.hidden_size)  # noqa: E731
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": col(0, 1, 2, 3, 4), "lm_head.weight": col(10, 11, 12, 13, 14),
        p + "self_attn.q_proj.weight": col(100, 101, 102, 103),
        p + "self_attn.k_proj.weight": col(200, 201), p + "self_attn.v_proj.weight": col(300, 301),
        p + "self_attn.o_proj.weight": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]),
        p + "mlp.gate_proj.weight": col(400, 401, 402, 403), p + "mlp.up_proj.weight": col(500, 501, 502, 503),
        p + "mlp.down_proj.weight": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]),
        p + "input_layernorm.weight": torch.tensor([7.0, 8]), p + "post_attention_layernorm.weight": torch.tensor([9.0, 10]),
        "model.norm.weight": torch.tensor([11.0, 12]),
    }


def test_layouts_by_hand():
    spec = _hand_spec()
    hf = _hand_hf(spec)
    m = "decoder.layers.0."
    full = hf_to_megatron(hf, spec, 1, 0)
    # Per group g: its 2 query heads, its key head, its value head.
    assert full[m + "self_attention.linear_qkv.weight"][:, 0].tolist() == [100, 101, 200, 300, 102, 103, 201, 301]
    # fc1 = [gate; up].
    assert full[m + "mlp.linear_fc1.weight"][:, 0].tolist() == [400, 401, 402, 403, 500, 501, 502, 503]
    r1 = hf_to_megatron(hf, spec, 2, 1)
    # TP rank 1 of 2 holds group 1 whole, and the second half of gate and of up.
    assert r1[m + "self_attention.linear_qkv.weight"][:, 0].tolist() == [102, 103, 201, 301]
    assert r1[m + "mlp.linear_fc1.weight"][:, 0].tolist() == [402, 403, 502, 503]
    # Row-parallel weights split their input columns: o_proj columns 2..3, down_proj columns 2..3.
    assert r1[m + "self_attention.linear_proj.weight"].tolist() == [[3, 4], [7, 8]]
    assert r1[m + "mlp.linear_fc2.weight"].tolist() == [[3, 4], [7, 8]]
    # Vocabulary 5 padded to 6 for TP 2: rank 1 holds rows 3, 4 and one zero row.
    assert r1["embedding.word_embeddings.weight"][:, 0].tolist() == [3, 4, 0]
    assert r1["output_layer.weight"][:, 0].tolist() == [13, 14, 0]
    assert r1[m + "input_layernorm.weight"].tolist() == [7, 8]  # replicated


def test_critic_head_maps_to_value_head():
    spec = _hand_spec()
    hf = {k: v for k, v in _hand_hf(spec).items() if k != "lm_head.weight"}
    hf["score.weight"], hf["score.bias"] = torch.tensor([[0.5, -0.25]]), torch.tensor([0.125])
    shards = [hf_to_megatron(hf, spec, 2, r, role="critic") for r in range(2)]
    assert shards[1]["value_head.weight"].tolist() == [[0.5, -0.25]]
    assert "output_layer.weight" not in shards[0]
    back = megatron_to_hf(shards, spec, role="critic")
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("change, needle", [
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope type"),
])
def test_unsupported_options_are_named(change, needle):
    with pytest.raises(UnsupportedModel, match=needle):
        arch_from_hf_config(LlamaConfig(**SMALL, **change))


def test_tp_must_divide_heads():
    spec = arch_from_hf_config(CONFIGS["llama_tied"])
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's num_key_value_heads"):
        check_tp(spec, 3)


def test_missing_weight_is_named():
    spec = arch_from_hf_config(CONFIGS["llama_untied"])
    hf = random_hf_state(CONFIGS["llama_untied"])
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_megatron(hf, spec)


def test_transformer_engine_names_round_trip():
    spec = arch_from_hf_config(CONFIGS["qwen3"])
    local = hf_to_megatron(random_hf_state(CONFIGS["qwen3"]), spec, 2, 1)
    te = to_te_names(local)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in te)
    assert "decoder.final_layernorm.weight" in te  # not fused: it has no linear after it
    assert te["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] is local["decoder.layers.0.pre_mlp_layernorm.weight"]
    assert from_te_names(te).keys() == local.keys()


def test_vocab_parallel_logprobs_equal_the_full_kernel():
    """The sharded kernel on one rank holding the whole (padded) vocabulary equals the reference
    on the unpadded logits, values and gradients; two half-vocabulary shards summed (what the
    all-reduces do) equal it too (see tests/test_megatron_backend.py for the real TP=2 run)."""
    from relayrl.rl.deepspeed_backend import token_logprobs_and_entropy
    from relayrl.rl.megatron_logprobs import vocab_parallel_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    V, Vp = 37, 40  # 3 padding columns, as TP=4 (or 8) padding would add
    logits = torch.randn(2, 5, Vp, generator=g) * 3
    tokens = torch.randint(0, V, (2, 5), generator=g)
    w_lp, w_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)  # arbitrary upstream grads

    a = logits[..., :V].clone().requires_grad_(True)
    lp_ref, ent_ref = token_logprobs_and_entropy(a, tokens, temperature=0.7)
    ((lp_ref * w_lp).sum() + (ent_ref * w_ent).sum()).backward()

    b = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(b, tokens, 0, V, None, temperature=0.7)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    # |x| reaches ~15 here (scale 3 / temperature 0.7): fp32 rounding of lse and of E, sums of 37
    # terms of that size computed in another order, is ~1e-5; a wrong term is >= 1e-2.
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=3e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=3e-5)
    torch.testing.assert_close(b.grad[..., :V], a.grad, rtol=0, atol=3e-5)
    assert torch.equal(b.grad[..., V:], torch.zeros(2, 5, Vp - V))  # padding gets no gradient
    assert float(a.grad.abs().max()) > 1e-2
