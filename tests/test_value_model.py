"""The critic: backbone + scalar head, its value alignment, training and round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from relayrl.config import OptimConfig, TrainerConfig
from relayrl.critic.value_model import VALUE_HEAD, compute_values, load_value_model
from relayrl.model import make_tiny_model
from relayrl.rl.deepspeed_backend import DeepSpeedBackend

LENGTHS = [6, 11, 2, 8, 5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, intermediate_size=64)


def make_samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(8, 40, (n,), generator=g)} for n in lengths]


def critic(path, stage=0, mbs=2, lr=1e-2, seed=0):
    cfg = TrainerConfig(zero_stage=stage, micro_batch_size=mbs)
    return DeepSpeedBackend("critic", path, cfg, OptimConfig(lr=lr, grad_clip=None), seed=seed)


def test_value_model_takes_the_policy_backbone_and_a_fresh_head(tiny):
    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    torch.manual_seed(7)
    vm = load_value_model(tiny)
    lm_sd, vm_sd = lm.state_dict(), vm.state_dict()
    backbone = [k for k in vm_sd if k.startswith("model.")]
    assert backbone and all(torch.equal(vm_sd[k], lm_sd[k]) for k in backbone)
    assert set(vm_sd) - set(backbone) == {f"{VALUE_HEAD}.weight", f"{VALUE_HEAD}.bias"}
    assert vm_sd[f"{VALUE_HEAD}.weight"].shape == (1, lm.config.hidden_size)
    assert torch.equal(vm_sd[f"{VALUE_HEAD}.bias"], torch.zeros(1))
    assert all(m.p == 0.0 for m in vm.modules() if isinstance(m, nn.Dropout))
    torch.manual_seed(7)
    assert torch.equal(load_value_model(tiny).state_dict()[f"{VALUE_HEAD}.weight"], vm_sd[f"{VALUE_HEAD}.weight"])


@pytest.mark.parametrize("stage", [0, 3])
def test_values_are_aligned_to_the_state_after_each_token(tiny, stage):
    samples = make_samples(LENGTHS)
    got = critic(tiny, stage=stage, seed=3).forward_values(samples)
    torch.manual_seed(3)  # the backend seeds torch before drawing the head: same head here
    vm = load_value_model(tiny)
    with torch.no_grad():
        for s, values in zip(samples, got, strict=True):
            t = len(s["tokens"])
            assert values.shape == (t,) and values.dtype == torch.float32
            # values[i] = V(tokens[:i+1]): the model run on that prefix alone, read at its end.
            want = torch.stack([vm(input_ids=s["tokens"][None, : i + 1]).logits[0, -1, 0] for i in range(t)])
            torch.testing.assert_close(values, want, atol=2e-6, rtol=0)


def test_compute_values_zeroes_padding(tiny):
    vm = load_value_model(tiny)
    ids = torch.tensor([[9, 10, 11], [12, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with torch.no_grad():
        v = compute_values(vm, ids, mask)
        alone = vm(input_ids=ids[1:, :1]).logits[0, 0, 0]
    assert v.shape == (2, 3)
    assert v[1, 1:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(v[1, 0], alone, atol=2e-6, rtol=0)


def test_critic_train_step_fits_fixed_targets(tiny):
    samples = make_samples(LENGTHS, seed=1)
    g = torch.Generator().manual_seed(2)
    for s in samples:
        s["returns"] = torch.rand(len(s["tokens"]), generator=g) * 2 - 1
        s["value_mask"] = torch.ones(len(s["tokens"]), dtype=torch.int64)
    n_tokens = sum(LENGTHS)

    def mse(outputs, mb):
        err = (outputs["values"] - mb["returns"]) * mb["value_mask"]
        loss = (err**2).sum() / n_tokens
        return loss, {"mse": loss.item()}

    b = critic(tiny, stage=2, lr=1e-2)
    history = [b.train_step(samples, mse)["mse"] for _ in range(15)]
    # A head starting near 0 scores E[u^2] = 1/3 on targets u uniform on [-1, 1]; fitting
    # these per-token targets must take the error far below that and keep descending.
    assert history[0] == pytest.approx(1 / 3, abs=0.05)
    assert history[-1] < 0.2 * history[0]
    assert history[-1] < history[-2]
    # The returned value equals a fresh evaluation of the loss before the step.
    values = b.forward_values(samples)
    now = sum(((v - s["returns"]) ** 2).sum().item() for v, s in zip(values, samples, strict=True)) / n_tokens
    assert now < history[-1]


def test_saved_critic_reloads_with_its_head(tiny, tmp_path):
    b = critic(tiny, stage=0, seed=5)
    samples = make_samples(LENGTHS)
    for s in samples:
        s["returns"] = torch.ones(len(s["tokens"]))
    b.train_step(samples, lambda o, mb: (((o["values"] - mb["returns"]) ** 2 * mb["attention_mask"]).sum() / 32, {}))
    b.export_hf(tmp_path / "critic")
    config = AutoConfig.from_pretrained(tmp_path / "critic")
    assert config.architectures == ["LlamaForTokenClassification"] and config.num_labels == 1
    torch.manual_seed(999)  # a saved head must not be redrawn
    reloaded = load_value_model(tmp_path / "critic")
    state = b.state_dict_for_engine()
    assert set(state) == set(reloaded.state_dict())
    assert all(torch.equal(state[k], v) for k, v in reloaded.state_dict().items())
    # And a critic backend started from the saved critic continues from it.
    again = critic(tmp_path / "critic", stage=0, seed=999)
    for a, c in zip(again.forward_values(samples), b.forward_values(samples), strict=True):
        assert torch.equal(a, c)
