"""The ``TrainerBackend`` seam: what the driver asks of a policy or critic trainer.

The driver never touches DeepSpeed or Megatron directly; it hands per-sequence samples and a
loss function to a backend. A Megatron-core backend implements the same protocol.

Conventions (the same for every backend)
----------------------------------------
A *sample* is a dict of 1-D tensors of one sequence's length ``t``:

- ``tokens``    (t,) int64: prompt + response ids.
- ``loss_mask`` (t,) int64/bool: 1 = an action token (sampled by the policy, trained on).
- any further per-token fields the loss needs (``old_logprobs``, ``advantages``, ``returns``,
  ``old_values``, ``ref_logprobs``, ``value_mask``, ...), each (t,).

The backend groups samples into micro-batches, right-pads them (padding is described by
``attention_mask``; padded positions of every field are 0 and never read), and runs the model.

- Policy outputs per micro-batch: ``logprobs`` (b, t) where ``logprobs[:, i] =
  log p(tokens[i] | tokens[:i])`` at the sampling temperature (position 0 holds 0.0), and
  ``entropy`` (b, t) aligned the same way. Only action positions (``loss_mask`` 1) are read by
  anyone; a backend may leave positions before a micro-batch's first action unscored (0.0),
  which spares a prompt the LM head (DeepSpeed does; samples without a ``loss_mask`` are scored
  at every position).
- Critic outputs: ``values`` (b, t) where ``values[:, i] = V(tokens[:i+1])``, the value of the
  state *after* token i. The value of the state in which action token i was sampled is
  therefore ``values[:, i-1]``; the last position gives the bootstrap value of a truncated
  sequence. (``rl.batching`` does this alignment in one place.)

A ``LossFn`` is called once per micro-batch as ``loss_fn(outputs, micro_batch)`` and returns
``(loss, metrics)``. The loss is already normalised for the *whole* minibatch (e.g. divided by
the minibatch's total number of action tokens across micro-batches and data-parallel ranks), so
gradients are simply summed over micro-batches and ranks; the backend undoes any averaging its
engine applies. This is what makes micro-batch 1 x 8 equal to 8 x 1.
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol, runtime_checkable

import torch

Sample = dict[str, torch.Tensor]
MicroBatch = dict[str, torch.Tensor]
LossFn = Callable[[dict[str, torch.Tensor], MicroBatch], tuple[torch.Tensor, dict[str, float]]]
Role = Literal["policy", "critic", "reference"]


@runtime_checkable
class TrainerBackend(Protocol):
    role: Role

    def forward_logprobs(self, samples: list[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per sample, (t,) log-probabilities of its tokens (position 0 holds 0.0). No grad."""
        ...

    def forward_values(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Per sample, (t,) critic values ``V(tokens[:i+1])``. No grad. Critic role only."""
        ...

    def train_step(self, samples: list[Sample], loss_fn: LossFn, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step over ``samples`` (one minibatch), accumulating micro-batches.

        Returns summed loss metrics plus ``grad_norm`` and ``lr``."""
        ...

    def state_dict_for_engine(self) -> dict[str, torch.Tensor]:
        """Full (gathered) weights under HF names, on CPU, for weight sync. Policy role."""
        ...

    def export_hf(self, path: str, durable: bool = True) -> None:
        """Write an HF checkpoint directory (config, safetensors, tokenizer) of the current weights
        (atomically: a reader never sees part of one); ``durable=False``: without fsync (a weight
        hand-off to the engines, not a checkpoint)."""
        ...

    def save(self, path: str) -> None:
        """Write weights, optimizer, scheduler and RNG state under ``path`` (a directory)."""
        ...

    def load(self, path: str) -> None:
        """Restore everything ``save`` wrote."""
        ...
