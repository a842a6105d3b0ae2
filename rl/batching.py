"""From trajectories to training samples: alignment of values, rewards and advantages.

This is the one place where per-token quantities are lined up (see ``rl/backend.py``):

- ``logprobs[i]`` is log p(tokens[i] | tokens[:i]);
- the critic's raw output ``raw[i] = V(tokens[:i+1])``, so the value of the state in which
  action token i was sampled is ``raw[i-1]``, and the critic is trained at position i-1 with
  the return of action token i (``value_mask``/``returns``/``old_values`` are state-aligned);
- the task reward sits on the last action token of the last sub-trace of a trajectory.

Across compaction cuts (``chained_gae``): a trajectory's sub-traces are processed from the last
to the first; sub-trace i gets the value of sub-trace i+1's first action state as its
bootstrap and the advantage of that first action as its ``next_advantage``, so the recursion
runs on as if the trajectory had never been cut: with an identity summary (the state after the
cut has the value the uncut state had) the advantages equal the uncut trajectory's exactly.

Every cut between sub-traces is truncation of a context, not of the episode: it always
bootstraps and carries the advantage. The *last* sub-trace of an episode that a cap ended
(``terminal`` False) is a different matter, decided by ``algorithm.bootstrap_truncated``:

- off (the default): no bootstrap. The env scored the episode at the cap and that reward is
  final; the episode cannot earn more, so the critic's guess of further reward would be added
  to an outcome that is already complete. The state after the last token is also the one state
  of a sub-trace the critic is never trained on (no action follows it), so its value is the
  least reliable number in the batch. This is Pardo et al. 2018 ("Time Limits in Reinforcement
  Learning", arXiv:1712.00378) read the other way: when the limit is part of the task, as the
  cap is for a scored coding episode, reaching it is termination.
- on: the last sub-trace bootstraps from ``raw[-1]`` = V(all its tokens), the state in which the
  next action would have been sampled. Right for envs whose score at a cap is partial progress
  and whose cap is a budget of the trainer, not part of the task (Pardo et al.'s partial-episode
  bootstrapping).

Sub-agents (``rollout/subagent.py``; black-box contexts the proxy takes for sub-agents): a
child trace (``parent_segment >= 0``) continues at its parent. Its last action bootstraps from
the value of the parent's first action at or after ``parent_position`` (where the child's
answer returns and the parent acts next) and carries that action's advantage in, so the
child's advantages are those it would have had spliced into the parent's sequence right there;
where the parent takes no action after that point, the parent's own continuation passes through
(its next segment's first action, or the end of the episode). The parent's recursion does not
pass through its children. Children are numbered before the main chain.

The actor's lambda may be length-adaptive (VAPO, ``algorithm.lam_actor_adaptive_alpha``): one
lambda per trajectory from its action tokens over all sub-traces, so that the cut and uncut
trajectories still have the same advantages.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from relayrl.config import AlgorithmConfig
from relayrl.critic.gae import gae, gae_reference, length_adaptive_lambda
from relayrl.rl.advantages import group_relative_advantages, masked_whiten
from relayrl.rl.losses import gradient_shares
from relayrl.types import SubTrace, Trajectory

Sample = dict[str, torch.Tensor]


def flatten(groups: list[list[Trajectory]]) -> list[SubTrace]:
    """Trainable sub-traces of the non-failed trajectories, in order.

    A sub-trace without an action token is no step of the agent and is dropped. The one case in
    practice is an empty *last* sub-trace (a compaction on the last allowed turn, then the turn
    cap ends the episode in the fresh context), and it holds the reward: then the kept
    sub-traces are renumbered 0..k-1 and the new last one takes the episode's reward and
    ``terminal`` flag, so the reward still reaches GAE (and GRPO). Parent links follow the
    renumbering; a child trace whose parent was dropped is dropped too.
    """
    out: list[SubTrace] = []
    for t in (t for g in groups for t in g if not t.failed):
        kept = [s for s in t.sub_traces if s.num_response_tokens > 0]
        if len(kept) == len(t.sub_traces) or not kept:
            out += kept
            continue
        # A child whose parent was dropped (an untrained sub-agent's child) goes with it.
        alive = {s.segment for s in kept}
        while True:
            orphans = {s.segment for s in kept if s.segment in alive and s.parent_segment >= 0
                       and s.parent_segment not in alive}
            if not orphans:
                break
            alive -= orphans
        kept = [s for s in kept if s.segment in alive]
        renumber = {s.segment: i for i, s in enumerate(kept)}
        last = t.sub_traces[-1]
        out += [dataclasses.replace(s, segment=i, num_segments=len(kept),
                                    reward=last.reward if i == len(kept) - 1 else 0.0,
                                    terminal=last.terminal if i == len(kept) - 1 else False,
                                    parent_segment=renumber[s.parent_segment] if s.parent_segment >= 0 else -1)
                for i, s in enumerate(kept)]
    return out


def nothing_to_train(step: int, groups: list[list[Trajectory]]) -> str:
    """The warning for a step whose episodes left no trainable sub-trace (``flatten`` gave
    none: all failed, or none recorded an action): what happened to them, and the first error."""
    trajs = [t for g in groups for t in g]
    failed = [t for t in trajs if t.failed]
    kinds: dict[str, int] = {}
    for t in failed:
        kinds[t.failure_kind or "unknown"] = kinds.get(t.failure_kind or "unknown", 0) + 1
    text = (f"*** relayrl WARNING: step {step} has no sub-trace to train on: of {len(trajs)} episodes, "
            f"{len(failed)} failed ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items())) or 'none'}) and "
            f"{len(trajs) - len(failed)} recorded no action; the step is skipped (no update, no weight sync)")
    if failed and failed[0].error:
        first = " ".join(failed[0].error.split())
        text += f". First error: {first[:500]}"
    return text


def base_samples(subs: list[SubTrace]) -> list[Sample]:
    return [
        {
            "tokens": torch.tensor(s.tokens, dtype=torch.long),
            "loss_mask": torch.tensor(s.loss_mask, dtype=torch.long),
            "rollout_logprobs": torch.tensor(s.rollout_logprobs, dtype=torch.float32),
        }
        for s in subs
    ]


def pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Right-pad 1-D tensors to (b, t_max)."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def action_values(raw: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(t,) value of the state each action token was sampled in: raw[i-1]; 0 off the mask."""
    v = torch.zeros_like(raw)
    v[1:] = raw[:-1]
    return v * loss_mask


def next_segment_rows(subs: list[SubTrace]) -> torch.Tensor:
    """(b,) the row of the next sub-trace of the same trajectory, -1 for a last segment.

    Every trajectory present must be present whole (segments 0..num_segments-1, once each):
    a missing segment would silently restart the recursion, so it is an error instead.
    """
    row_of: dict[tuple[str, int], int] = {}
    for i, s in enumerate(subs):
        if (s.trajectory_id, s.segment) in row_of:
            raise ValueError(f"sub-trace {s.trajectory_id}/{s.segment} appears twice")
        row_of[(s.trajectory_id, s.segment)] = i
    for s in subs:
        missing = [k for k in range(s.num_segments) if (s.trajectory_id, k) not in row_of]
        if missing or not 0 <= s.segment < s.num_segments:
            raise ValueError(f"trajectory {s.trajectory_id}: segments {missing} of {s.num_segments} "
                             f"are missing (or segment {s.segment} is out of range); GAE needs all of them")
    return torch.tensor([row_of.get((s.trajectory_id, s.segment + 1), -1) for s in subs], dtype=torch.long)


def continuation_rows(subs: list[SubTrace]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's recursion continues after its last action: (row, position), both (b,).

    A main-chain sub-trace continues at position 0 of the next one (``next_segment_rows``); a
    child (``parent_segment >= 0``) at its parent's row, ``parent_position`` (the first action
    at or after it is the next step). Row -1: the trajectory ends after this row. Parent links
    are checked: the parent is present, the position inside its tokens, no cycles, and the main
    chain's last sub-trace (``num_segments - 1``) is no child.
    """
    nxt = next_segment_rows(subs)
    row_of = {(s.trajectory_id, s.segment): i for i, s in enumerate(subs)}
    dep = nxt.clone()
    pos = torch.zeros(len(subs), dtype=torch.long)
    for i, s in enumerate(subs):
        if s.parent_segment < 0:
            if dep[i] >= 0 and subs[int(dep[i])].parent_segment >= 0:
                raise ValueError(f"trajectory {s.trajectory_id}: segment {s.segment + 1} is a child trace but follows "
                                 "the main chain; children are numbered before the main chain")
            continue
        parent = row_of.get((s.trajectory_id, s.parent_segment))
        if parent is None or parent == i or s.segment == s.num_segments - 1:
            raise ValueError(f"sub-trace {s.trajectory_id}/{s.segment}: parent_segment {s.parent_segment} is not "
                             "another sub-trace of its trajectory (or the child is numbered last)")
        if not 0 <= s.parent_position <= len(subs[parent].tokens):
            raise ValueError(f"sub-trace {s.trajectory_id}/{s.segment}: parent_position {s.parent_position} is "
                             f"outside its parent's {len(subs[parent].tokens)} tokens")
        dep[i], pos[i] = parent, s.parent_position
    return dep, pos


def _depths(dep: torch.Tensor) -> torch.Tensor:
    """(b,) how many continuations each row is from the end of its trajectory."""
    b = len(dep)
    depth = [-1] * b
    for i in range(b):
        path = []
        j = i
        while j >= 0 and depth[j] < 0:
            if j in path:
                raise ValueError("parent links form a cycle")
            path.append(j)
            j = int(dep[j])
        d = depth[j] if j >= 0 else -1
        for k in reversed(path):
            d += 1
            depth[k] = d
    return torch.tensor(depth, dtype=torch.long)


def _per_row(x: float | torch.Tensor | None, b: int) -> torch.Tensor:
    if x is None:
        return torch.zeros(b, dtype=torch.float64)
    return torch.as_tensor(x, dtype=torch.float64).expand(b).clone()


def chained_gae(subs: list[SubTrace], rewards: torch.Tensor, values: torch.Tensor, masks: torch.Tensor,
                gamma: float, lam: float | torch.Tensor,
                last_bootstrap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over every sub-trace, continued across the cuts between sub-traces of a trajectory.

    rewards, values, masks: (b, t) action-aligned, one row per sub-trace of ``subs``.
    lam: a float or a (b,) tensor (the same value on every row of a trajectory, or the cut
        trajectory is not the uncut one).
    last_bootstrap: (b,) value after the last token, read only on the rows that are the last
        segment of their trajectory (0 there = no bootstrap); None = all 0.
    Returns (advantages, returns), (b, t), in ``values``' dtype (computed in float64, so the
    carry is not rounded at every cut).

    Rows are processed by depth from the end of their trajectory (last segments first), one
    batched ``gae`` call per depth. A row continues (``continuation_rows``) at a row of smaller
    depth, already done: the next segment from its start, or, for a sub-agent's trace, its
    parent from ``parent_position``. It takes ``bootstrap`` = the value of the first action
    state there and ``next_advantage`` = that action's advantage; where that row has no action
    from there on, its own bootstrap and carry pass through. ``chained_gae_reference`` is the
    definition it is tested against.
    """
    b = len(subs)
    dep, pos = continuation_rows(subs)
    lam_b = _per_row(lam, b)
    last_b = _per_row(last_bootstrap, b)
    rewards64, values64 = rewards.to(torch.float64), values.to(torch.float64)
    depth = _depths(dep)
    steps = torch.arange(masks.shape[1] if masks.dim() == 2 else 0)
    boot_b = torch.zeros(b, dtype=torch.float64)
    carry_b = torch.zeros(b, dtype=torch.float64)
    adv = torch.zeros_like(values64)
    ret = torch.zeros_like(values64)
    for d in range(int(depth.max()) + 1 if b else 0):
        rows = torch.nonzero(depth == d, as_tuple=False)[:, 0]
        n = dep[rows]
        has_next = n >= 0
        n = n.clamp(min=0)
        after = masks[n].bool() & (steps[None, :] >= pos[rows][:, None])  # actions of the continuation
        found = has_next & after.any(dim=1)
        first = after.to(torch.int8).argmax(dim=1)
        value_there = values64[n, first]
        adv_there = adv[n, first]
        boot = torch.where(found, value_there, torch.where(has_next, boot_b[n], last_b[rows]))
        carry = torch.where(found, adv_there, torch.where(has_next, carry_b[n], torch.zeros_like(value_there)))
        a, r = gae(rewards64[rows], values64[rows], masks[rows], boot, gamma, lam_b[rows], carry)
        adv[rows], ret[rows] = a, r
        boot_b[rows], carry_b[rows] = boot, carry
    return adv.to(values.dtype), ret.to(values.dtype)


def chained_gae_reference(subs: list[SubTrace], rewards: torch.Tensor, values: torch.Tensor, masks: torch.Tensor,
                          gamma: float, lam: float | torch.Tensor,
                          last_bootstrap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition ``chained_gae`` is tested against: for each row, the path the episode
    takes from it to its end (its own action tokens, then those of the row it continues at,
    from the continuation's position on, and so on: the later segments for a main-chain
    sub-trace; for a sub-agent's trace its parent's actions after the answer returns, then the
    parent's own continuation) is one uncut sequence, run through ``gae_reference``; the row
    keeps the values of its own tokens. Same arguments and results as ``chained_gae``."""
    b = len(subs)
    dep, pos = continuation_rows(subs)  # the same checks
    _depths(dep)
    lam_b = _per_row(lam, b)
    last_b = _per_row(last_bootstrap, b)
    lams: dict[str, set[float]] = {}
    for i, s in enumerate(subs):
        lams.setdefault(s.trajectory_id, set()).add(float(lam_b[i]))
    for tid, ls in lams.items():
        if len(ls) != 1:
            raise ValueError(f"trajectory {tid} has more than one lambda: {sorted(ls)}")
    adv = torch.zeros(values.shape, dtype=torch.float64)
    ret = torch.zeros(values.shape, dtype=torch.float64)
    for i in range(b):
        own = masks[i].bool()
        r_parts, v_parts = [rewards[i][own]], [values[i][own]]
        j, end = int(dep[i]), i
        p = int(pos[i])
        while j >= 0:
            m = masks[j].bool().clone()
            m[:p] = False
            r_parts.append(rewards[j][m])
            v_parts.append(values[j][m])
            end, p, j = j, int(pos[j]), int(dep[j])
        r = torch.cat(r_parts).to(torch.float64)
        v = torch.cat(v_parts).to(torch.float64)
        a, rt = gae_reference(r[None], v[None], torch.ones(1, len(r), dtype=torch.long),
                              last_b[end][None], gamma, float(lam_b[i]))
        k = int(own.sum())
        adv[i][own], ret[i][own] = a[0, :k], rt[0, :k]
    return adv.to(values.dtype), ret.to(values.dtype)


def trajectory_response_lengths(subs: list[SubTrace]) -> torch.Tensor:
    """(b,) action tokens of each row's whole trajectory (all its sub-traces in ``subs``)."""
    total: dict[str, int] = {}
    for s in subs:
        total[s.trajectory_id] = total.get(s.trajectory_id, 0) + s.num_response_tokens
    return torch.tensor([total[s.trajectory_id] for s in subs], dtype=torch.long)


def last_bootstraps(subs: list[SubTrace], raws: list[torch.Tensor], cfg: AlgorithmConfig) -> torch.Tensor:
    """(b,) the value after the last token of each truncated last sub-trace (``raw[-1]`` =
    V(all its tokens)) when ``cfg.bootstrap_truncated``, else 0 (module docstring)."""
    out = torch.zeros(len(subs), dtype=torch.float64)
    if cfg.bootstrap_truncated:
        for i, (s, raw) in enumerate(zip(subs, raws, strict=True)):
            if s.segment == s.num_segments - 1 and not s.terminal:
                out[i] = float(raw[-1])
    return out


def rewards_tensor(subs: list[SubTrace], masks: torch.Tensor) -> torch.Tensor:
    """(b, t) the trajectory reward on the last action token of its last sub-trace."""
    rewards = torch.zeros(masks.shape, dtype=torch.float32)
    for i, s in enumerate(subs):
        if s.segment == s.num_segments - 1:
            last = int(torch.nonzero(masks[i], as_tuple=False)[-1])
            rewards[i, last] = s.reward
    return rewards


def gae_advantages(subs: list[SubTrace], samples: list[Sample], raws: list[torch.Tensor],
                   cfg: AlgorithmConfig) -> dict[str, float]:
    """Fill ``advantages`` (token-aligned) and the critic's state-aligned targets into samples.

    Every sub-trace gets critic targets, the compacted ones included (their first state is
    system + task + summary), so value pretraining (``critic_warmup_steps``) trains on them too.
    """
    masks_list = [s["loss_mask"] for s in samples]
    masks = pad(masks_list)
    values = pad([action_values(r, m) for r, m in zip(raws, masks_list, strict=True)])
    rewards = rewards_tensor(subs, masks)
    last_boot = last_bootstraps(subs, raws, cfg)
    lam_actor: float | torch.Tensor = cfg.lam_actor
    if cfg.lam_actor_adaptive_alpha is not None:
        lam_actor = length_adaptive_lambda(trajectory_response_lengths(subs), cfg.lam_actor_adaptive_alpha)
    # VC-PPO: the actor's advantages and the critic's targets use separate lambdas, each with
    # its own recursion across the cuts.
    adv, ret = chained_gae(subs, rewards, values, masks, cfg.gamma, lam_actor, last_boot)
    if cfg.lam_actor_adaptive_alpha is not None or cfg.lam_critic != cfg.lam_actor:
        _, ret = chained_gae(subs, rewards, values, masks, cfg.gamma, cfg.lam_critic, last_boot)
    raw_adv = adv
    if cfg.normalize_advantages:
        adv = masked_whiten(adv, masks.float())
    for i, s in enumerate(samples):
        t = len(s["tokens"])
        s["advantages"] = adv[i, :t] * masks_list[i]
        # Critic targets at state positions i-1 for each action token i.
        m = masks_list[i]
        value_mask = torch.zeros(t, dtype=torch.long)
        value_mask[:-1] = m[1:]
        returns_state = torch.zeros(t)
        returns_state[:-1] = ret[i, 1:t]
        s["value_mask"] = value_mask
        s["returns"] = returns_state * value_mask
        s["old_values"] = raws[i] * value_mask
    mask_f = masks.float()
    n = mask_f.sum().clamp(min=1)
    metrics = {
        "adv/raw_mean": float((raw_adv * mask_f).sum() / n),
        "adv/returns_mean": float((ret * mask_f).sum() / n),
        "critic/values_mean": float((values * mask_f).sum() / n),
    }
    if torch.is_tensor(lam_actor) and len(subs):
        metrics["adv/lam_actor_mean"] = float(lam_actor.to(torch.float64).mean())
    return metrics


def grpo_advantages(subs: list[SubTrace], samples: list[Sample], cfg: AlgorithmConfig) -> dict[str, float]:
    """Group-relative advantages of each trajectory's reward, on every action token."""
    final = {s.trajectory_id: s for s in subs if s.segment == s.num_segments - 1}
    ids = list(final)
    group_index: dict[str, int] = {}
    gidx = torch.tensor([group_index.setdefault(final[t].group_id, len(group_index)) for t in ids])
    rewards = torch.tensor([final[t].reward for t in ids])
    adv = group_relative_advantages(rewards, gidx, normalize_std=cfg.grpo_normalize_std)
    adv_of = dict(zip(ids, adv.tolist(), strict=True))
    for s, smp in zip(subs, samples, strict=True):
        smp["advantages"] = smp["loss_mask"].float() * adv_of.get(s.trajectory_id, 0.0)
    return {"adv/abs_mean": float(adv.abs().mean()) if len(ids) else 0.0}


def gradient_share_metrics(subs: list[SubTrace], cfg: AlgorithmConfig) -> dict[str, float]:
    """How the loss weight spreads over sub-traces under ``cfg.loss_reduction``.

    A sub-trace's share is the summed weight its tokens get in the loss over the batch's total
    (``gradient_shares``): n_i / N for token_mean, seq_mean_token_sum and constant, 1 / B for
    seq_mean_token_mean.
    Computed as if the step's batch were one minibatch. Metrics:

    - ``loss/max_subtrace_share``: the largest share of one sub-trace;
    - ``loss/longest_over_shortest_share``: the share of the sub-trace with the most action
      tokens over that of the one with the fewest (1 = lengths do not matter);
    - ``loss/effective_subtrace_frac``: exp(entropy of the shares) / B, the fraction of the
      sub-traces that effectively carry the gradient (1 = all alike);
    - ``loss/share_before_cuts``: the share of the sub-traces that end in a compaction cut
      (all but the last of each trajectory);
    - ``loss/total_weight``: the sum of all token weights: 1 for token_mean and
      seq_mean_token_mean, N / C for ``constant`` and N / B for ``seq_mean_token_sum`` (their
      loss scale follows the batch's length).
    """
    if not subs:
        return {}
    n = torch.tensor([s.num_response_tokens for s in subs])
    shares = gradient_shares(n, cfg.loss_reduction, cfg.loss_constant)
    longest, shortest = int(n.argmax()), int(n.argmin())
    positive = shares[shares > 0]
    entropy = float(-(positive * positive.log()).sum())
    before_cut = torch.tensor([s.segment < s.num_segments - 1 and s.parent_segment < 0 for s in subs])
    divisor = {"constant": cfg.loss_constant, "seq_mean_token_sum": float(len(subs))}.get(cfg.loss_reduction)
    total_weight = float(n.sum()) / divisor if divisor else 1.0
    return {
        "loss/max_subtrace_share": float(shares.max()),
        "loss/longest_over_shortest_share": float(shares[longest] / shares[shortest]) if shares[shortest] > 0 else 0.0,
        "loss/effective_subtrace_frac": math.exp(entropy) / len(subs),
        "loss/share_before_cuts": float(shares[before_cut].sum()),
        "loss/total_weight": total_weight if float(n.sum()) > 0 else 0.0,
    }
