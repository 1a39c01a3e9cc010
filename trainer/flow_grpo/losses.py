"""The clipped policy-gradient loss of Flow-GRPO and how its per-token terms are averaged.

Tensors here are *flat over response tokens*: every response token of every planner turn in the
batch is one entry, in any order. Two index tensors describe the structure:

- ``token_turn`` (n_tokens,) long: which turn each token belongs to, in [0, n_turns);
- ``turn_trajectory`` (n_turns,) long: which trajectory each turn belongs to, in [0, n_traj).

Averaging is expressed as one weight per token, so a loss is ``(weights * per_token).sum()``.
That makes micro-batching exact: the learner computes the weights once for the whole update and
each micro-batch contributes its slice, whatever the packing.

- ``paper``: mean over tokens within a turn, over turns within a trajectory, over trajectories:
  w = 1 / (|a_it| * T_i * N), with T_i the turns of trajectory i that have tokens and N the
  trajectories that have tokens. With equal group sizes this is the paper's E_q[(1/G) sum_i ...].
- ``tokenMean`` (the reference code): every token counts the same: w = 1 / n_tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowlane.api.enums import Aggregation


@dataclass(frozen=True)
class PolicyLossTerms:
    """Per-token pieces of the clipped objective. All shapes (n_tokens,)."""

    loss: torch.Tensor  # -min(r A, clip(r) A) (times the importance weight when given)
    ratio: torch.Tensor  # pi_theta / pi_old
    clipped_low: torch.Tensor  # bool: A < 0 and r < 1 - eps_low (the clipped term is active)
    clipped_high: torch.Tensor  # bool: A > 0 and r > 1 + eps_high


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    importance_weights: torch.Tensor | None = None,
) -> PolicyLossTerms:
    """PPO/GRPO clipped surrogate with separate low and high clip ranges, negated for minimisation.

    loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = exp(logp - old)

    Shapes: log_prob, old_log_prob, advantages (n_tokens,); importance_weights (n_tokens,) or None
    (truncated importance weights for stale samples; treated as constants).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if importance_weights is not None:
        loss = loss * importance_weights.detach()
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1.0 - eps_low)
        clipped_high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return PolicyLossTerms(loss=loss, ratio=ratio.detach(), clipped_low=clipped_low, clipped_high=clipped_high)


def paper_weights(token_turn: torch.Tensor, turn_trajectory: torch.Tensor) -> torch.Tensor:
    """w = 1 / (|a_it| * T_i * N). Shapes: token_turn (n_tokens,), turn_trajectory (n_turns,) -> (n_tokens,)."""
    n_turns = turn_trajectory.numel()
    tokens_per_turn = torch.bincount(token_turn, minlength=n_turns)
    turn_has_tokens = tokens_per_turn > 0
    n_traj = int(turn_trajectory.max().item()) + 1 if n_turns else 0
    turns_per_traj = torch.zeros(n_traj, dtype=torch.long).index_add_(
        0, turn_trajectory, turn_has_tokens.long()
    )
    n_active_traj = int((turns_per_traj > 0).sum().item())
    turn_weight = 1.0 / (
        tokens_per_turn.clamp_min(1).double()
        * turns_per_traj[turn_trajectory].clamp_min(1).double()
        * max(n_active_traj, 1)
    )
    return turn_weight[token_turn].to(torch.float32)


def token_mean_weights(token_turn: torch.Tensor, turn_trajectory: torch.Tensor) -> torch.Tensor:
    """w = 1 / n_tokens. Shapes: token_turn (n_tokens,), turn_trajectory (n_turns,) -> (n_tokens,)."""
    del turn_trajectory
    n_tokens = token_turn.numel()
    return torch.full((n_tokens,), 1.0 / max(n_tokens, 1), dtype=torch.float32)


AggregationWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

AGGREGATIONS: dict[Aggregation, AggregationWeights] = {
    Aggregation.PAPER: paper_weights,
    Aggregation.TOKEN_MEAN: token_mean_weights,
}


def aggregate(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of per-token terms (weights from an ``AGGREGATIONS`` entry). (n,), (n,) -> ()."""
    return (per_token * weights.to(per_token.dtype)).sum()
