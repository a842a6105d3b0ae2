"""Shims that let megatron-core 0.16 run its GPT model, and its pipeline schedule, on a CPU,
for tests only.

megatron-core assumes CUDA in these places that the CPU tests reach:

1. ``torch.cuda.current_device()`` is called to place tensors (the rotary embedding's
   ``inv_freq``, the ``GlobalMemoryBuffer`` that tensor-parallel layers gather into). On a CPU
   build of torch it raises "Torch not compiled with CUDA enabled". The shim makes it return
   the CPU device, so those tensors land where the model already is.
2. ``CudaRNGStatesTracker.fork`` (entered by core attention around its dropout, and by
   tensor-parallel weight init) swaps CUDA generator states, and ``add`` seeds one. The shim
   keeps the tracker's named states as *CPU* generator states instead: ``add(name, seed)``
   records the CPU state seeded with ``seed``, ``fork(name)`` swaps it in and out, exactly as
   the CUDA version does for CUDA states.
3. Pipeline parallel: the 1F1B schedule counts tokens in ``torch.zeros(..., device="cuda")``
   and the p2p communicator calls ``torch.cuda.synchronize()`` after its batched sends; a tied
   model's last stage moves its embedding copy with ``weight.data.cuda()`` before the
   all-reduce that copies the first stage's values into it. The shim gives the schedule module
   a ``torch`` whose ``zeros`` puts ``"cuda"`` tensors on the CPU, makes ``synchronize`` a no-op
   (gloo's sends have completed when their requests are waited on) and, while a model sets up
   its embedding and output layer, ``Tensor.cuda`` return the tensor itself.

Nothing here is imported by relayrl itself: the product path (``rl/megatron_backend.py``)
runs megatron-core unmodified on GPUs. ``install()`` is idempotent and process-wide, which is
why only test processes (and the CPU benchmark) call it.
"""

from __future__ import annotations

import contextlib

import torch

_installed = False


def install() -> None:
    """Patch ``torch.cuda.current_device`` and megatron's CUDA RNG tracker for CPU (idempotent)."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cpu rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    mrandom.CudaRNGStatesTracker.get_states = get_states

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCpuForCuda()
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t  # type: ignore[assignment]
        try:
            setup(self)
        finally:
            torch.Tensor.cuda = cuda  # type: ignore[assignment]

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu
    _installed = True


class _TorchWithCpuForCuda:
    """``torch`` for megatron's schedule module, ``zeros(..., device="cuda")`` on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)
