"""``overwrite_safetensors``: a weight hand-off rewritten in place, only when the layout fits."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from relayrl.rl.checkpoint import overwrite_safetensors


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(10, 4, generator=g)
    return {
        "embed.weight": embed,
        "head.weight": embed,  # tied: saved once
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "step": torch.tensor(seed, dtype=torch.int64),
    }


def _save(directory, state) -> None:
    directory.mkdir(exist_ok=True)
    save_file({k: v for k, v in state.items() if k != "head.weight"}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def test_new_values_written_in_place_over_the_same_layout(tmp_path):
    _save(tmp_path, _state(0))
    file = tmp_path / "model.safetensors"
    inode, size = file.stat().st_ino, file.stat().st_size
    new = _state(1)
    assert overwrite_safetensors(tmp_path, new)
    assert (file.stat().st_ino, file.stat().st_size) == (inode, size)
    got = load_file(str(file))
    assert sorted(got) == ["embed.weight", "norm.weight", "step"]
    for k, v in got.items():
        assert v.dtype == new[k].dtype and torch.equal(v, new[k]), k


def test_sharded_files_are_each_written(tmp_path):
    state = _state(0)
    save_file({"embed.weight": state["embed.weight"]}, str(tmp_path / "a.safetensors"))
    save_file({"norm.weight": state["norm.weight"], "step": state["step"]}, str(tmp_path / "b.safetensors"))
    new = _state(2)
    assert overwrite_safetensors(tmp_path, new)
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["embed.weight"], new["embed.weight"])
    assert torch.equal(load_file(str(tmp_path / "b.safetensors"))["norm.weight"], new["norm.weight"])


def test_another_layout_is_refused_and_the_file_left_as_it_was(tmp_path):
    old = _state(0)
    _save(tmp_path, old)
    before = (tmp_path / "model.safetensors").read_bytes()
    changed = {
        "a shape": _state(1) | {"embed.weight": torch.randn(11, 4)},
        "a dtype": _state(1) | {"norm.weight": torch.randn(4)},
        "a missing tensor": {k: v for k, v in _state(1).items() if k != "step"},
        "an extra tensor, not tied": _state(1) | {"bias": torch.randn(4)},
        "a tied one untied": _state(1) | {"head.weight": torch.randn(10, 4)},
    }
    for why, state in changed.items():
        assert not overwrite_safetensors(tmp_path, state), why
        assert (tmp_path / "model.safetensors").read_bytes() == before, why
    assert not overwrite_safetensors(tmp_path / "absent", _state(1))
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")  # truncated: no header
    assert not overwrite_safetensors(tmp_path, _state(1))
