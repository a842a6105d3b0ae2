"""The embedded CPU inference engine: continuous batching over ``rollout.llama.LlamaModel``.

One background thread owns the model and runs the loop (vLLM/SGLang-style scheduling, reduced
to what a CPU needs):

1. take what arrived (generation, scoring and weight-update requests: a thread-safe queue);
2. between steps, apply weight updates and run scoring requests;
3. admit waiting requests into free slots: one packed prefill samples their first tokens
   (identical prompts, a group's completions of one task, are computed once);
4. decode one token for every active slot at once; a finished sequence frees its slot at once.

Requests may arrive at any time from any thread; each gets a ``concurrent.futures.Future``
(``asyncio.wrap_future`` makes it awaitable on any event loop). The ``Engine`` protocol methods
are async wrappers over those futures.

Sampling, per request: temperature (0 = greedy), top_p, top_k, stop tokens (plus the model's EOS
unless ``ignore_eos``), max_new_tokens and a seed. A seeded request draws its one uniform number
per token from its own ``torch.Generator`` and samples by inverting the CDF of its own row, so the
same seed and the same logits give the same tokens whatever else is in the batch. Logprobs are
``log_softmax(logits / temperature)`` of the sampled token, before top-p/top-k truncation.

Weight updates are in place between steps (like SGLang's ``update_weights_from_disk`` without
aborting): in-flight requests continue with the new weights; each completion records the weight
version at its first sampled token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from relayrl.rollout.engine import Completion, EngineError, GenerateRequest, SamplingParams
from relayrl.rollout.llama import LlamaModel, LlamaSpec, read_hf_config, read_safetensors

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Temperatures below this are greedy (SGLang uses the same cut-off).
_GREEDY_EPS = 1e-5
# Rows of the LM head computed at once when scoring ([chunk, V] floats at a time).
_SCORE_CHUNK = 512


# ----------------------------------------------------------------------------- sampling


@dataclass
class SamplingBatch:
    """Per-row sampling settings of a batch, as tensors (rebuilt when the batch changes).

    temperature: ``[n]`` (1.0 on greedy rows). greedy: ``[n]`` bool. top_p: ``[n]``.
    top_k: ``[n]`` (V where off). truncate: any row with top-p or top-k on.
    generators: per row, its own generator or the engine's.
    """

    temperature: torch.Tensor
    greedy: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    truncate: bool
    all_greedy: bool
    generators: list[torch.Generator]
    unit_temperature: bool = False  # every row at T = 1 (greedy rows count as 1): no division

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator], vocab: int) -> "SamplingBatch":
        greedy = [p.temperature < _GREEDY_EPS for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        temperature = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        return cls(
            temperature=torch.tensor(temperature),
            greedy=torch.tensor(greedy),
            top_p=torch.tensor(top_p),
            top_k=torch.tensor(top_k),
            truncate=any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p),
            all_greedy=all(greedy),
            generators=generators,
            unit_temperature=all(t == 1.0 for t in temperature),
        )


def truncate_probs(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Zero what top-k and top-p (nucleus, Holtzman et al. 2020) cut; rows are not renormalised.

    probs: ``[n, V]``; top_p: ``[n]`` in (0, 1]; top_k: ``[n]`` in 1..V. A token is kept if its
    rank is below k and the probability mass strictly before it is at most p (so the most
    likely token is always kept). Same rule as SGLang's torch sampler.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1])
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop = (rank[None, :] >= top_k[:, None]) | (mass_before > top_p[:, None])
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def sample_reference(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The simple version of ``sample``: the whole row's CDF in float64. Tests hold ``sample``
    to it; the engine runs ``sample``.

    logits: ``[n, V]``. The logprob is ``log_softmax(logits / T)`` at the sampled token, before
    truncation (greedy rows: T = 1). Sampling inverts the row's CDF at one uniform draw from the
    row's generator, so a row's token depends only on its own logits and generator.
    """
    logp = torch.log_softmax(logits.float() / batch.temperature[:, None], dim=-1)
    if batch.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logp.exp()
        if batch.truncate:
            rows = (batch.top_k < probs.shape[-1]) | (batch.top_p < 1.0)
            probs[rows] = truncate_probs(probs[rows], batch.top_p[rows], batch.top_k[rows])
        # float64 CDF: the float32 running sum over ~50k entries drifts enough to matter.
        cdf = probs.double().cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in batch.generators])
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens = tokens.clamp_(max=probs.shape[-1] - 1)
        tokens = torch.where(batch.greedy, logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


_CDF_BLOCK = 256


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens ``[n]`` int64, logprobs ``[n]`` float32).

    The same rule as ``sample_reference`` (one uniform draw per row from the row's own
    generator, inverted through the row's CDF; the logprob is ``log_softmax(logits / T)`` at the
    sampled token, before truncation), computed in fewer passes over ``[n, V]``, which at batch
    32 and a 49k vocabulary cost as much as a tenth of a decode step:

    - no ``log_softmax`` of the whole row: the logprob of the one sampled token is
      ``z[tok] - max(z) - log(sum(exp(z - max(z))))`` with ``z = logits / T``;
    - a two-level CDF instead of a float64 cumsum of all V entries: sums of blocks of
      ``_CDF_BLOCK`` unnormalised probabilities (float32 pairwise sums of terms in [0, 1], so
      relative error ~1e-7, without converting the ``[n, V]`` row to float64 first: that copy
      alone was two thirds of the sampler's time), their float64 cumsum picks the block, and
      only that block is cumsummed in float64 to pick the token. The CDFs of the two functions
      differ by rounding only (~1e-7 of the row mass), so they pick the same token except for a
      draw within that distance of a boundary;
    - no division by a temperature that is 1 on every row;
    - argmax only where a row is greedy.
    """
    z = logits.float()
    if not batch.unit_temperature:
        z = z / batch.temperature[:, None]
    if batch.all_greedy:
        tokens = z.argmax(dim=-1)
        return tokens, z.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    n, v = z.shape
    zmax = z.amax(dim=-1, keepdim=True)
    weights = (z - zmax).exp_()  # unnormalised probabilities
    pad = -v % _CDF_BLOCK

    def block_sums(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = (torch.nn.functional.pad(w, (0, pad)) if pad else w).view(n, -1, _CDF_BLOCK)
        return blocks, blocks.sum(dim=-1).double().cumsum(dim=-1)

    blocks, block_cdf = block_sums(weights)
    log_mass = block_cdf[:, -1].log().float()  # the logprob is before truncation
    if batch.truncate:
        rows = (batch.top_k < v) | (batch.top_p < 1.0)
        weights[rows] = truncate_probs(weights[rows] / weights[rows].sum(-1, keepdim=True), batch.top_p[rows], batch.top_k[rows])
        blocks, block_cdf = block_sums(weights)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in batch.generators])
    target = (u * block_cdf[:, -1])[:, None]
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, b[:, :, None].expand(n, 1, _CDF_BLOCK)).squeeze(1).double().cumsum(dim=-1) + before
    j = torch.searchsorted(inner, target, right=True).clamp_(max=_CDF_BLOCK - 1)
    tokens = (b * _CDF_BLOCK + j).squeeze(1).clamp_(max=v - 1)
    if bool(batch.greedy.any()):
        tokens = torch.where(batch.greedy, z.argmax(dim=-1), tokens)
    logprobs = z.gather(1, tokens[:, None]).squeeze(1) - zmax.squeeze(1) - log_mass
    return tokens, logprobs


def token_logprobs(logits: torch.Tensor, targets: list[int], temperature: float) -> list[float]:
    """``log_softmax(logits / T)[i, targets[i]]`` for logits ``[n, V]`` and ``n`` targets.

    temperature 0 (greedy) scores at T = 1, as ``sample`` does.
    """
    t = 1.0 if temperature < _GREEDY_EPS else temperature
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    index = torch.tensor(targets, dtype=torch.long)[:, None]
    return logp.gather(1, index).squeeze(1).tolist()


# ----------------------------------------------------------------------------- engine state


@dataclass
class _Seq:
    """One generation request inside the engine.

    length: tokens in this sequence's KV cache slot (prompt + fed outputs).
    """

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    future: Future
    length: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    weight_version: int = 0
    prompt_logits: torch.Tensor | None = None
    """Logits ``[V]`` after its prompt (for a later request with the same prompt)."""
    cached_tokens: int = 0


@dataclass
class _Score:
    token_ids: list[int]
    temperature: float
    future: Future


@dataclass
class _Update:
    state: dict[str, torch.Tensor]
    version: int
    future: Future


@dataclass
class _Flush:
    future: Future


_STOP = object()


class CpuEngine:
    """Continuous-batching engine over one ``LlamaModel``; implements the ``Engine`` protocol.

    model_path: an HF checkpoint directory (config.json + safetensors).
    max_batch_size: slots decoded together. max_seq_len: prompt + completion limit per slot.
    num_threads: torch intra-op threads of the engine thread (set there, so the caller's own
        setting is left alone as far as torch allows); None leaves torch's default.
    max_prefill_tokens: prompt tokens admitted per prefill (at least one prompt always is), so a
        burst of long prompts does not stall running decodes for too long.
    seed: seeds the engine generator that unseeded requests draw from.
    min_prefix_reuse: a finished sequence's keys and values stay in a free slot, and a new
        prompt that starts with at least this many of its tokens (the next turn of a multi-turn
        episode) is prefilled only from there on; 0 = off.
    """

    def __init__(
        self,
        model_path: str | Path,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        num_threads: int | None = None,
        dtype: str = "float32",
        max_prefill_tokens: int = 4096,
        seed: int = 0,
        min_prefix_reuse: int = 16,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
        self.model_path = str(model_path)
        self.num_threads = num_threads
        self.model = LlamaModel.from_pretrained(model_path, max_batch_size, max_seq_len, _DTYPES[dtype])
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.min_prefix_reuse = min_prefix_reuse
        self._kept: dict[int, tuple[list[int], int]] = {}  # free slot -> (tokens cached there, weight version)
        self.vocab_size = self.model.spec.vocab_size
        self.eos_token_ids = frozenset(_eos_token_ids(Path(model_path)))
        self._version = 0
        self._rng = torch.Generator().manual_seed(seed)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._sampling: SamplingBatch | None = None  # None = rebuild before the next decode
        self._stopped = False
        self._error: BaseException | None = None
        self.stats = {"steps": 0, "prefills": 0, "prefill_tokens": 0, "prefix_reused_tokens": 0, "generated_tokens": 0,
                      "last_update_s": 0.0}
        self._thread = threading.Thread(target=self._run, name="cpu-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ thread-safe API

    def submit(self, request: GenerateRequest) -> Future:
        """Queue a generation request; the future resolves to a ``Completion`` or EngineError."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerateRequest]) -> list[Future]:
        """Queue several generation requests at once: they arrive together, so free slots take
        them in one prefill (in which identical prompts are computed once)."""
        futures: list[Future] = []
        seqs: list[_Seq] = []
        for request in requests:
            fut: Future = Future()
            futures.append(fut)
            try:
                seq = self._make_seq(request, fut)
            except EngineError as e:
                fut.set_exception(e)
                continue
            if request.sampling.max_new_tokens == 0:
                fut.set_result(Completion([], [], "length", self._version, len(request.input_ids)))
                continue
            seqs.append(seq)
        if seqs:
            self._put(seqs)
        return futures

    def submit_score(self, token_ids: list[int], temperature: float = 1.0) -> Future:
        """Queue a scoring request; resolves to per-token logprobs (position 0 = 0.0)."""
        fut: Future = Future()
        try:
            self._validate_ids(token_ids, limit=self.max_seq_len)
        except EngineError as e:
            fut.set_exception(e)
            return fut
        self._put(_Score(list(token_ids), float(temperature), fut))
        return fut

    def submit_weights(self, state: dict[str, torch.Tensor], version: int) -> Future:
        """Queue an in-place weight update from an HF state dict; applied between steps."""
        fut: Future = Future()
        self._put(_Update(state, int(version), fut))
        return fut

    def flush_cache(self) -> Future:
        """Queue dropping every kept prefix (the keys and values of finished sequences); running
        and waiting requests are untouched. Resolves to the number of kept slots dropped."""
        fut: Future = Future()
        self._put(_Flush(fut))
        return fut

    def load_weights(self, path: str | Path, version: int) -> float:
        """Read safetensors from an HF dir (in the caller's thread), apply between steps, wait.

        Returns the seconds decoding was paused for the copy (reading the files does not pause).
        """
        state = self._read_checkpoint(path)
        self.submit_weights(state, version).result()
        return self.stats["last_update_s"]

    def generate_many(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Blocking: submit all, wait for all (order kept)."""
        return [f.result() for f in self.submit_many(requests)]

    def current_weight_version(self) -> int:
        return self._version

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopped and self._error is None

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; unfinished requests fail with EngineError."""
        if not self._stopped:
            self._stopped = True
            self._inbox.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ Engine protocol

    async def generate(self, request: GenerateRequest) -> Completion:
        return await asyncio.wrap_future(self.submit(request))

    async def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        return await asyncio.wrap_future(self.submit_score(token_ids, temperature))

    async def update_weights(self, path: str, version: int) -> None:
        state = await asyncio.get_running_loop().run_in_executor(None, self._read_checkpoint, path)
        await asyncio.wrap_future(self.submit_weights(state, version))

    async def health(self) -> bool:
        return self.is_healthy()

    async def weight_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ validation

    def _put(self, item: Any) -> None:
        if self._stopped or not self._thread.is_alive():
            raise EngineError("the CPU engine is shut down")
        self._inbox.put(item)

    def _validate_ids(self, ids: list[int], limit: int) -> None:
        if len(ids) == 0:
            raise EngineError("input_ids is empty; give at least one token")
        if len(ids) > limit:
            raise EngineError(
                f"the input ({len(ids)} tokens) is longer than the engine's context allows "
                f"({limit} tokens, engine max_seq_len={self.max_seq_len}); shorten the prompt or "
                "raise engine.max_seq_len"
            )
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise EngineError(f"input_ids contains token id {lo if lo < 0 else hi} outside the vocabulary 0..{self.vocab_size - 1}")

    def _make_seq(self, request: GenerateRequest, fut: Future) -> _Seq:
        p = request.sampling
        # At least one slot position must stay free for the first sampled token.
        self._validate_ids(request.input_ids, limit=self.max_seq_len - 1)
        if p.max_new_tokens < 0:
            raise EngineError(f"sampling_params.max_new_tokens={p.max_new_tokens}: must be >= 0")
        if p.temperature < 0:
            raise EngineError(f"sampling_params.temperature={p.temperature}: must be >= 0")
        if not 0.0 < p.top_p <= 1.0:
            raise EngineError(f"sampling_params.top_p={p.top_p}: must be in (0, 1]")
        stop = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | self.eos_token_ids
        gen = torch.Generator().manual_seed(int(p.seed)) if p.seed is not None else self._rng
        return _Seq(list(request.input_ids), p, frozenset(stop), gen, fut)

    def _read_checkpoint(self, path: str | Path) -> dict[str, torch.Tensor]:
        """Read and check an HF dir for a weight update; EngineError if it does not fit."""
        try:
            spec = LlamaSpec.from_hf_config(read_hf_config(path))
            state = read_safetensors(path)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load weights from {path}: {e}") from None
        if spec != self.model.spec:
            raise EngineError(f"cannot load weights from {path}: its architecture differs from the served model's")
        return state

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                while self._take_inbox(block=not self._active and not self._waiting):
                    if self._waiting and len(self._active) < self.max_batch_size:
                        self._guarded(self._admit)
                    if self._active:
                        self._guarded(self._decode_step)
        except BaseException as e:  # a bug in the loop itself: report it on every request
            self._error = e
            log.exception("CPU engine loop died")
        finally:
            self._stopped = True
            self._fail_all(EngineError(f"the CPU engine stopped ({self._error or 'shut down'})"))

    def _take_inbox(self, block: bool) -> bool:
        """Move arrivals into the queues and run control requests; False when told to stop.

        Control requests run in arrival order (a score after a weight update sees the new
        weights); consecutive scores are packed into one forward.
        """
        items: list[Any] = []
        while True:
            try:
                items.append(self._inbox.get(block=block and not items))
            except queue.Empty:
                break
        scores: list[_Score] = []
        for item in items:
            if item is _STOP:
                self._run_scores(scores)
                return False
            if isinstance(item, list):  # generation requests (submit_many)
                self._waiting.extend(item)
            elif isinstance(item, _Score):
                scores.append(item)
            elif isinstance(item, _Update):
                self._run_scores(scores)
                scores = []
                self._apply_update(item)
            elif isinstance(item, _Flush):
                _set_result(item.future, len(self._kept))
                self._kept.clear()
        self._run_scores(scores)
        return True

    def _guarded(self, step) -> None:
        """Run a step; if it raises, fail the requests it touched instead of dying."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - surfaced to every affected caller
            log.exception("CPU engine step failed")
            err = EngineError(f"engine step failed: {type(e).__name__}: {e}")
            for seq in self._active:
                _set_exception(seq.future, err)
            self._active.clear()
            self._sampling = None

    def _admit(self) -> None:
        """Prefill waiting requests into free slots ``n..``; sample their first tokens."""
        batch: list[_Seq] = []
        tokens = 0
        free = self.max_batch_size - len(self._active)
        while self._waiting and len(batch) < free:
            n = len(self._waiting[0].prompt)
            if batch and tokens + n > self.max_prefill_tokens:
                break
            seq = self._waiting.popleft()
            if seq.future.cancelled():
                continue
            batch.append(seq)
            tokens += n
        if not batch:
            return
        first = len(self._active)
        slots = list(range(first, first + len(batch)))
        # Identical prompts (a group's completions of one task) are computed once: within the
        # batch, and against running slots prefilled with the current weights (a slot keeps its
        # prompt's keys and values at positions 0..). The others get a copy of those keys and
        # values and the same last-token logits.
        # (A slot's weight_version is the one its prompt was computed with.)
        running = {tuple(s.prompt): i for i, s in enumerate(self._active) if s.weight_version == self._version}
        batch, reuse = self._place_prefixes(batch, first, set(running))
        fresh: dict[tuple[int, ...], int] = {}
        source: list[tuple[bool, int]] = []  # (from a running slot, its index) or (False, batch index)
        for j, s in enumerate(batch):
            key = tuple(s.prompt)
            source.append((True, running[key]) if key in running else (False, fresh.setdefault(key, j)))
        compute = sorted(set(fresh.values()))
        starts = {j: reuse[j][1] if j in reuse else 0 for j in compute}
        shared = self._shared_prefixes(batch, compute, starts)
        try:
            # A kept prefix is copied into its new slot before any prefill writes a slot.
            for j, (src_slot, length) in reuse.items():
                if src_slot != slots[j]:
                    self.model.move_slot(src_slot, slots[j], length)
            for slot in slots:
                self._kept.pop(slot, None)
            # Two passes when prompts of the batch share a prefix: the leaders whole, then each
            # follower from the end of the prefix it shares with its leader (copied over first).
            new: dict[int, torch.Tensor] = {}
            for part in ([j for j in compute if j not in shared], [j for j in compute if j in shared]):
                if not part:
                    continue
                for j in part:
                    if j in shared:
                        leader, starts[j] = shared[j]
                        self.model.move_slot(slots[leader], slots[j], starts[j])
                out = self.model.prefill([batch[j].prompt[starts[j]:] for j in part], [slots[j] for j in part],
                                         [starts[j] for j in part])
                new.update(zip(part, out))
            rows = []
            for j, (is_running, src) in enumerate(source):
                src_slot = src if is_running else slots[src]
                if src_slot != slots[j]:
                    self.model.move_slot(src_slot, slots[j], len(batch[j].prompt))
                rows.append(self._active[src].prompt_logits if is_running else new[src])
            logits = torch.stack(rows)
        except Exception as e:  # noqa: BLE001 - only this batch fails; running decodes go on
            log.exception("prefill failed")
            for s in batch:
                _set_exception(s.future, EngineError(f"prefill failed: {type(e).__name__}: {e}"))
            return
        self.stats["prefill_tokens"] += sum(len(batch[j].prompt) - st for j, st in starts.items())
        self.stats["prefix_reused_tokens"] += sum(starts.values())
        for j, s in enumerate(batch):
            s.length = len(s.prompt)
            s.weight_version = self._version
            s.prompt_logits = logits[j]
            s.cached_tokens = starts[j] if source[j] == (False, j) else len(s.prompt)
        self._active.extend(batch)
        self._sampling = None
        self.stats["prefills"] += 1
        self._sample_and_advance(logits, first)

    def _shared_prefixes(self, batch: list[_Seq], compute: list[int], starts: dict[int, int]
                         ) -> dict[int, tuple[int, int]]:
        """Prompts of one batch that share a prefix (a system prompt, a task's instructions):
        batch index of a follower -> (its leader's batch index, the prefix length).

        A prompt is a follower if it starts with at least ``min_prefix_reuse`` tokens of an
        earlier leader, and more of them than any kept prefix gives it (``starts``); otherwise
        it leads. Leaders are computed whole first, and a follower's keys and values for the
        shared prefix are copied from its leader's slot.
        """
        if self.min_prefix_reuse <= 0:
            return {}
        leaders: list[int] = []
        shared: dict[int, tuple[int, int]] = {}
        for j in compute:
            prompt = batch[j].prompt
            best, leader = max(starts[j], self.min_prefix_reuse - 1), -1
            for other in leaders:
                n = _common_prefix(prompt, batch[other].prompt, len(prompt) - 1, self.min_prefix_reuse)
                if n > best:
                    best, leader = n, other
            if leader >= 0:
                shared[j] = (leader, best)
            else:
                leaders.append(j)
        return shared

    def _place_prefixes(self, batch: list[_Seq], first: int, running: set[tuple[int, ...]]
                        ) -> tuple[list[_Seq], dict[int, tuple[int, int]]]:
        """Match prompts against the kept keys and values of finished sequences (``_kept``).

        A prompt that starts with at least ``min_prefix_reuse`` tokens of a kept sequence
        computed with the current weights (the next turn of an agent: its last context, the
        reply and a new observation) is prefilled from there on. Returns the batch, reordered
        so that a prompt whose kept prefix lies in the slots the batch fills gets that very slot
        (no copy), and per batch index ``(slot holding the prefix, its length)``. Kept slots the
        batch fills and does not use are dropped by the caller.
        """
        if not self._kept or self.min_prefix_reuse <= 0:
            return batch, {}
        best: dict[int, tuple[int, int]] = {}
        for j, s in enumerate(batch):
            if tuple(s.prompt) in running:
                continue
            # At least the prompt's last token is computed: its logits sample the first token.
            cap = len(s.prompt) - 1
            found = (0, -1)
            for slot, (ids, version) in self._kept.items():
                if version != self._version:
                    continue
                n = _common_prefix(s.prompt, ids, cap, self.min_prefix_reuse)
                if n > found[0]:
                    found = (n, slot)
            if found[0] >= self.min_prefix_reuse:
                best[j] = (found[1], found[0])
        if not best:
            return batch, {}
        targets = range(first, first + len(batch))
        at: dict[int, int] = {}  # target slot -> batch index that takes it (its prefix is there)
        for j, (slot, _) in best.items():
            if slot in targets and slot not in at:
                at[slot] = j
        rest = iter(j for j in range(len(batch)) if j not in at.values())
        order = [at[t] if t in at else next(rest) for t in targets]
        return [batch[j] for j in order], {k: best[j] for k, j in enumerate(order) if j in best}

    def _decode_step(self) -> None:
        """Feed every active slot its last token; sample the next one."""
        tokens = torch.tensor([s.output_ids[-1] for s in self._active], dtype=torch.long)
        positions = torch.tensor([s.length for s in self._active], dtype=torch.long)
        logits = self.model.decode(tokens, positions)
        for s in self._active:
            s.length += 1
        self.stats["steps"] += 1
        self._sample_and_advance(logits, 0)

    def _sample_and_advance(self, logits: torch.Tensor, first: int) -> None:
        """Sample for slots ``first..n-1`` (rows of ``logits``), record, retire finished ones."""
        if self._sampling is None:
            self._sampling = SamplingBatch.build(
                [s.params for s in self._active], [s.generator for s in self._active], self.vocab_size
            )
        sb = self._sampling
        if first:
            sb = _slice_sampling(sb, first)
        tokens, logprobs = sample(logits, sb)
        finished: list[int] = []
        for i, (tok, lp) in enumerate(zip(tokens.tolist(), logprobs.tolist()), start=first):
            s = self._active[i]
            s.output_ids.append(tok)
            s.output_logprobs.append(lp)
            reason = self._finish_reason(s, tok)
            if reason is not None:
                finished.append(i)
                _set_result(s.future, Completion(s.output_ids, s.output_logprobs, reason, s.weight_version, len(s.prompt), s.cached_tokens))
        self.stats["generated_tokens"] += len(tokens)
        self._retire(finished)

    def _finish_reason(self, s: _Seq, tok: int) -> str | None:
        if tok in s.stop_ids:
            return "stop"
        if len(s.output_ids) >= s.params.max_new_tokens:
            return "length"
        # The next decode would feed this token at position prompt+outputs-1; the sequence
        # (prompt + outputs) must fit in max_seq_len.
        if len(s.prompt) + len(s.output_ids) >= self.max_seq_len:
            return "length"
        if s.future.cancelled():
            return "abort"
        return None

    def _retire(self, finished: list[int]) -> None:
        """Free finished slots, moving the last active slot into each hole (highest first).

        With ``min_prefix_reuse``, a finished sequence's keys and values are kept in the slot
        just past the active ones (swapped there), until a new request needs that slot or
        continues them (``_place_prefixes``)."""
        if not finished:
            return
        keep = self.min_prefix_reuse > 0
        for i in sorted(finished, reverse=True):
            last = len(self._active) - 1
            done = self._active[i]
            if i != last:
                moved = self._active[last]
                if keep:
                    self.model.swap_slots(i, last, done.length, moved.length)
                else:
                    self.model.move_slot(last, i, moved.length)
                self._active[i] = moved
            self._active.pop()
            if keep:
                self._kept[last] = ((done.prompt + done.output_ids)[: done.length], done.weight_version)
        self._sampling = None

    def _run_scores(self, items: list[_Score]) -> None:
        """Score sequences in packs of at most ``max_prefill_tokens`` tokens (one always fits)."""
        pack: list[_Score] = []
        tokens = 0
        for it in items:
            if pack and tokens + len(it.token_ids) > self.max_prefill_tokens:
                self._score_pack(pack)
                pack, tokens = [], 0
            pack.append(it)
            tokens += len(it.token_ids)
        if pack:
            self._score_pack(pack)

    def _score_pack(self, items: list[_Score]) -> None:
        try:
            hidden = self.model.hidden_packed([it.token_ids for it in items])
            start = 0
            for it in items:
                n = len(it.token_ids)
                _set_result(it.future, self._token_logprobs(hidden[start : start + n], it.token_ids, it.temperature))
                start += n
        except Exception as e:  # noqa: BLE001
            log.exception("scoring failed")
            for it in items:
                _set_exception(it.future, EngineError(f"scoring failed: {type(e).__name__}: {e}"))

    def _token_logprobs(self, hidden: torch.Tensor, token_ids: list[int], temperature: float) -> list[float]:
        """Per-token logprobs of one sequence from its hidden states ``[T, E]``.

        The LM head runs in chunks of rows so a long sequence never materialises ``[T, V]``.
        """
        out = [0.0]
        for c0 in range(0, len(token_ids) - 1, _SCORE_CHUNK):
            c1 = min(c0 + _SCORE_CHUNK, len(token_ids) - 1)
            logits = self.model.logits(hidden[c0:c1])
            out += token_logprobs(logits, token_ids[c0 + 1 : c1 + 1], temperature)
        return out

    def _apply_update(self, item: _Update) -> None:
        t0 = time.perf_counter()
        try:
            self.model.load_state_dict(item.state)
        except Exception as e:  # noqa: BLE001
            _set_exception(item.future, EngineError(f"weight update failed: {e}"))
            return
        self._version = item.version
        self._kept.clear()  # computed with the old weights (whatever the version numbers say)
        self.stats["last_update_s"] = time.perf_counter() - t0
        _set_result(item.future, None)

    def _fail_all(self, err: EngineError) -> None:
        for s in list(self._active) + list(self._waiting):
            _set_exception(s.future, err)
        self._active.clear()
        self._kept.clear()
        self._waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            for pending in item if isinstance(item, list) else [item]:
                if pending is not _STOP:
                    _set_exception(pending.future, err)


def _common_prefix(a: list[int], b: list[int], cap: int, need: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``cap`` (bisection over slice
    comparisons, which run in C: prompts are thousands of tokens); 0 at once if their first
    ``need`` tokens differ (the cheap rejection of most pairs)."""
    n = min(len(a), len(b), cap)
    if n < need or a[:need] != b[:need]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _slice_sampling(sb: SamplingBatch, first: int) -> SamplingBatch:
    return SamplingBatch(
        temperature=sb.temperature[first:],
        greedy=sb.greedy[first:],
        top_p=sb.top_p[first:],
        top_k=sb.top_k[first:],
        truncate=sb.truncate,
        all_greedy=bool(sb.greedy[first:].all()),
        generators=sb.generators[first:],
        unit_temperature=bool((sb.temperature[first:] == 1.0).all()),
    )


def _set_result(fut: Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


def _eos_token_ids(model_dir: Path) -> set[int]:
    """EOS ids from config.json and generation_config.json (int or list in either)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        f = model_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(e) for e in eos)
    return ids
