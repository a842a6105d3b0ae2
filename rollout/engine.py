"""The ``Engine`` seam: what rollout code may ask of an inference engine.

Rollout code talks to this protocol, never to a concrete engine. Implementations:

- ``relayrl.rollout.client.HttpEngineClient``: speaks SGLang's native HTTP API, so the same
  client serves the embedded CPU engine server and a real SGLang fleet behind its router.
- ``relayrl.rollout.cpu_engine.CpuEngine``: the embedded engine itself, in-process.

Log-probabilities are always of the temperature-scaled distribution (``log_softmax(logits /
temperature)``) before any top-p/top-k truncation, so that the trainer can recompute them with
the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class SamplingParams:
    """Per-request sampling settings (the SGLang ``sampling_params`` subset relayrl uses).

    seed: per-request sampling seed; with the same logits the same tokens are drawn whatever
        else the engine is batching (needed for deterministic runs). None = engine RNG.
    temperature: 0 means greedy (argmax); its logprobs are then those of temperature 1.
    ignore_eos: keep sampling past the model's EOS token(s). Like SGLang, an engine stops at the
        model's EOS by default, in addition to ``stop_token_ids``.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def to_sglang(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop_token_ids": list(self.stop_token_ids),
            # Keep stop tokens in the output: the trainer must see exactly what was sampled.
            "no_stop_trim": True,
            "skip_special_tokens": False,
            "ignore_eos": self.ignore_eos,
        }
        if self.seed is not None:
            d["sampling_seed"] = int(self.seed)
        return d

    @classmethod
    def from_sglang(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(
            max_new_tokens=int(d.get("max_new_tokens", 128)),
            temperature=float(d.get("temperature", 1.0)),
            top_p=float(d.get("top_p", 1.0)),
            top_k=int(d.get("top_k", -1)),
            stop_token_ids=[int(t) for t in d.get("stop_token_ids") or []],
            seed=None if d.get("sampling_seed") is None else int(d["sampling_seed"]),
            ignore_eos=bool(d.get("ignore_eos", False)),
        )


class EngineError(RuntimeError):
    """An engine could not serve a request: bad input (a prompt longer than the context), a dead
    or unreachable server, a timeout, a failed weight update.

    url: the server that failed, or None for an in-process engine.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(f"{url}: {message}" if url else message)
        self.url = url


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling: SamplingParams


@dataclass
class Completion:
    """What the engine sampled for one request.

    output_ids: the sampled tokens, including a stop token if one ended generation.
    output_logprobs: per output token, its log-probability (see module docstring).
    finish_reason: "stop" (a stop token) or "length" (max_new_tokens or the context limit).
    weight_version: the engine's weight version when the first token was sampled.
    cached_tokens: prompt tokens whose keys and values were reused, not computed (SGLang's
        ``meta_info.cached_tokens``).
    """

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str
    weight_version: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    async def generate(self, request: GenerateRequest) -> Completion:
        """Sample a completion for one request; many calls may be in flight at once."""
        ...

    async def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probability of each token given its prefix; position 0 gets 0.0."""
        ...

    async def update_weights(self, path: str, version: int) -> None:
        """Load new weights (an HF safetensors directory) and tag them ``version``."""
        ...

    async def health(self) -> bool:
        ...

    async def weight_version(self) -> int:
        ...
