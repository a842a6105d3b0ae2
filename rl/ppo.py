"""Loss functions for the trainer backends, built from an ``AlgorithmConfig``.

A builder is called once per minibatch with the minibatch's global counts; the ``LossFn`` it
returns is called by the backend once per micro-batch (``rl/backend.py``). The math lives in
``rl.losses``; this module only wires config, fields and reductions together.

Fields read
-----------
Policy: ``outputs["logprobs"]`` (b, t) with grad; ``outputs["entropy"]`` (b, t) (needed when
entropy_coef > 0, logged when present); ``mb["old_logprobs"]`` (unless ``old_from_forward``), ``mb["advantages"]``,
``mb["loss_mask"]`` (b, t), all on *action-token* positions; ``mb["ref_logprobs"]`` (b, t)
when kl_coef > 0.

Critic: ``outputs["values"]`` (b, t) where ``values[:, j] = V(tokens[:j+1])`` is the value of
the state *after* token j (backend convention). The value of the state in which action token
i was sampled is therefore at position i - 1. The sample carries its critic fields already on
those *state* positions:

    value_mask[j] = loss_mask[j + 1]          (1 where the state j is where an action was sampled)
    returns[j]    = return target of action token j + 1
    old_values[j] = the critic's value at position j when the targets were computed
                    (``forward_values`` output as it is: already on state positions)

``rl.batching`` does this shift (and the reverse one for the values GAE reads). Position 0 is
never an action token (a sequence starts with a prompt), so no action is lost.

Metrics
-------
Every metric a ``LossFn`` returns is that micro-batch's *contribution*: already divided by the
minibatch's global normaliser, so the backend's sum over micro-batches (and data-parallel ranks)
is the minibatch value. ``pg_loss``, ``kl``, ``entropy``, ``vf_loss`` and ``loss`` use the
configured reduction; fractions and means (``clipfrac``, ``ratio_mean``, ``value_mean``...) are
per action token, divided by ``num_tokens``.
"""

from __future__ import annotations

import torch

from relayrl.config import AlgorithmConfig
from relayrl.rl.backend import LossFn, MicroBatch
from relayrl.rl.losses import kl_penalty, policy_loss, reduce_loss, reduction_normaliser, value_loss


def _to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detach and copy every metric to Python floats with one device sync."""
    values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return dict(zip(stats, values, strict=True))


def _need(d: dict[str, torch.Tensor], key: str, where: str, why: str) -> torch.Tensor:
    if key not in d:
        raise KeyError(f"{where}[{key!r}] is missing; {why}")
    return d[key]


def make_policy_loss_fn(cfg: AlgorithmConfig, num_tokens: int, num_sequences: int,
                        old_from_forward: bool = False) -> LossFn:
    """The PPO policy ``LossFn`` for one minibatch.

    num_tokens: action tokens of the whole minibatch (all micro-batches, all ranks).
    num_sequences: sequences of the whole minibatch.
    old_from_forward: the old logprobs are this forward's own, detached (the minibatch is the
        first and only update of the weights that scored it; ``mb["old_logprobs"]`` is not read).

    loss = reduce(L_clip) + kl_coef * reduce(kl) - entropy_coef * reduce(entropy), every term
    reduced with ``cfg.loss_reduction`` against the global normaliser. Metrics (summable):
    ``loss``, ``pg_loss``, ``kl`` (kl_coef > 0), ``entropy`` (when the backend gives it),
    ``clipfrac``, ``clipfrac_low``, ``clipfrac_high``, ``dual_clipfrac``, ``ratio_mean``,
    ``approx_kl``: the mean over the minibatch's action tokens (loss_mask 1, whatever the
    reduction) of 0.5 * (logp - logp_old)^2, Schulman's k2 estimate of KL(pi_old || pi), the
    drift of this update from the policy that the old logprobs came from; >= 0, 0 while they
    agree (``rl.losses.policy_loss``). The ratio in the loss and in ``ratio_mean`` has its
    log clamped to +-``rl.losses.LOG_RATIO_CLAMP``.
    """
    mode = cfg.loss_reduction
    normaliser = reduction_normaliser(mode, num_tokens, num_sequences, cfg.loss_constant)
    per_token_norm = float(max(num_tokens, 1))

    def loss_fn(outputs: dict[str, torch.Tensor], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs = _need(outputs, "logprobs", "outputs", "the policy backend must return per-token logprobs")
        mask = mb["loss_mask"].bool()
        old = logprobs.detach() if old_from_forward else mb["old_logprobs"]
        pg, ind = policy_loss(
            logprobs, old, mb["advantages"], mask,
            cfg.clip_low, cfg.clip_high, cfg.dual_clip,
        )
        pg_loss = reduce_loss(pg, mask, mode, normaliser)
        loss = pg_loss
        stats: dict[str, torch.Tensor] = {"pg_loss": pg_loss}
        if cfg.kl_coef > 0:
            ref = _need(mb, "ref_logprobs", "micro_batch", "algorithm.kl_coef > 0 needs reference logprobs")
            zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
            kl = kl_penalty(torch.where(mask, logprobs, zero), torch.where(mask, ref, zero), cfg.kl_estimator)
            kl_loss = reduce_loss(kl, mask, mode, normaliser)
            loss = loss + cfg.kl_coef * kl_loss
            stats["kl"] = kl_loss
        entropy = outputs.get("entropy")
        if cfg.entropy_coef > 0 and entropy is None:
            raise KeyError("outputs['entropy'] is missing; algorithm.entropy_coef > 0 needs per-token entropy")
        if entropy is not None:
            ent = reduce_loss(entropy, mask, mode, normaliser)
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * ent
            stats["entropy"] = ent
        low, high = ind["clipped_low"].sum(), ind["clipped_high"].sum()
        stats.update(
            loss=loss,
            clipfrac=(low + high) / per_token_norm,
            clipfrac_low=low / per_token_norm,
            clipfrac_high=high / per_token_norm,
            dual_clipfrac=ind["dual_clipped"].sum() / per_token_norm,
            ratio_mean=ind["ratio"].sum() / per_token_norm,
            approx_kl=ind["approx_kl"].sum() / per_token_norm,
        )
        return loss, _to_floats(stats)

    return loss_fn


def make_value_loss_fn(cfg: AlgorithmConfig, num_tokens: int, num_sequences: int) -> LossFn:
    """The clipped value ``LossFn`` for one minibatch (fields on state positions, see above).

    num_tokens: value-trained states of the whole minibatch (= its action tokens).
    num_sequences: sequences of the whole minibatch.

    Metrics (summable): ``vf_loss``, ``vf_clipfrac``, ``value_mean``, ``return_mean``,
    ``value_mse`` (mean of (V - R)^2).
    """
    mode = cfg.loss_reduction
    normaliser = reduction_normaliser(mode, num_tokens, num_sequences, cfg.loss_constant)
    per_token_norm = float(max(num_tokens, 1))

    def loss_fn(outputs: dict[str, torch.Tensor], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        values = _need(outputs, "values", "outputs", "the critic backend must return per-token values")
        mask = _need(mb, "value_mask", "micro_batch",
                     "critic samples carry value_mask (loss_mask moved to state positions)").bool()
        returns = mb["returns"]
        per_token, ind = value_loss(values, mb["old_values"], returns, mask, cfg.value_clip)
        vf_loss = reduce_loss(per_token, mask, mode, normaliser)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        stats = {
            "vf_loss": vf_loss,
            "vf_clipfrac": ind["clipped"].sum() / per_token_norm,
            "value_mean": torch.where(mask, values, zero).sum() / per_token_norm,
            "return_mean": torch.where(mask, returns, zero).sum() / per_token_norm,
            "value_mse": (ind["error"] ** 2).sum() / per_token_norm,
        }
        return vf_loss, _to_floats(stats)

    return loss_fn
