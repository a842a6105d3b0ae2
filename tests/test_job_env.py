"""The environment a job gives its actors (``rl.job.actor_env``): library quieting and glibc malloc
settings (``ray.keep_freed_memory``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from relayrl.config import load_config
from relayrl.rl.job import MALLOC_TUNABLES, actor_env, glibc_tunables


def test_glibc_tunables_adds_missing_keys_and_keeps_the_users():
    ours = {"glibc.malloc.mmap_threshold": "1024", "glibc.malloc.trim_threshold": "2048"}
    assert glibc_tunables(None, ours) == "glibc.malloc.mmap_threshold=1024:glibc.malloc.trim_threshold=2048"
    assert glibc_tunables("", ours) == "glibc.malloc.mmap_threshold=1024:glibc.malloc.trim_threshold=2048"
    # A key the user set keeps the user's value; other keys of theirs stay, in their order, first.
    assert (glibc_tunables("glibc.malloc.trim_threshold=7:glibc.cpu.hwcaps=-AVX512F", ours)
            == "glibc.malloc.trim_threshold=7:glibc.cpu.hwcaps=-AVX512F:glibc.malloc.mmap_threshold=1024")


def test_actor_env_carries_the_malloc_settings_unless_turned_off(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own setting wins
    env = actor_env(load_config(None, []))
    assert env["GLIBC_TUNABLES"] == glibc_tunables(None)
    assert env["TRANSFORMERS_VERBOSITY"] == "info" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "GLIBC_TUNABLES" not in actor_env(load_config(None, ["ray.keep_freed_memory=false"]))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert actor_env(load_config(None, []))["GLIBC_TUNABLES"] == (
        f"glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold={MALLOC_TUNABLES['glibc.malloc.trim_threshold']}")


# Forward and backward of a small MLP whose activations (8-16 MiB) are what a train step frees and
# allocates again every micro-batch; prints the minor page faults of three steps after warm-up.
_FAULTS = """
import resource, torch
torch.manual_seed(0)
torch.set_num_threads(1)
m = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 8192))
x = torch.randn(512, 256)
def step():
    m(x).logsumexp(-1).sum().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_malloc_settings_make_a_train_step_reuse_its_pages():
    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables is not None:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    default, tuned = faults(None), faults(glibc_tunables(None))
    # glibc's defaults unmap and fault in every step's activations: three steps of ~64 MiB of
    # fresh pages are ~16k faults or more; with the settings the pages are the heap's, reused.
    assert default > 16_000, default
    assert tuned < default / 8, (tuned, default)
