"""Group-relative advantages: how much better one trajectory did than its siblings.

Flow-GRPO samples G trajectories per question and scores each with one outcome reward R_i. The
reward says nothing about *which* planner turn earned it, so every turn of trajectory i gets the
same advantage A_i: the outcome is broadcast over the turns (the learner does the broadcast;
these functions return one value per trajectory).

Two normalisations exist in the wild and both are selectable:

- ``trajectory`` (the paper): mean and std over the G trajectory rewards of the question.
- ``turn`` (the reference code): mean and std over all *turn samples* of the question, i.e. each
  trajectory's reward counted once per planner turn it took. Long trajectories then weigh more in
  the baseline; the advantage is still constant within a trajectory.

The std is the sample std (Bessel-corrected, like ``torch.std`` and the reference code). A group
of one sample, or one whose rewards are all equal, has no signal: its advantages are exactly 0.
Pure tensor functions; no I/O, no config objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowlane.api.enums import AdvantageMode


def _normalise_in_groups(
    values: torch.Tensor,
    group_index: torch.Tensor,
    counts: torch.Tensor,
    eps: float,
    normalize_by_std: bool,
) -> torch.Tensor:
    """(values - weighted group mean) / (weighted group sample std + eps), each value counted
    ``counts[k]`` times. Shapes: values, group_index, counts: (n,) -> (n,)."""
    values = values.to(torch.float64)
    weights = counts.to(torch.float64)
    n_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    weight_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, weights)
    value_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, weights * values)
    mean = value_sum / weight_sum.clamp_min(1.0)
    centred = values - mean[group_index]
    if not normalize_by_std:
        return centred.to(torch.float32)
    square_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, weights * centred**2)
    # Sample std over the expanded multiset; a single sample has std 0 (and centred value 0).
    var = square_sum / (weight_sum - 1.0).clamp_min(1.0)
    return (centred / (var.sqrt()[group_index] + eps)).to(torch.float32)


def trajectory_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    turns_per_trajectory: torch.Tensor,
    eps: float = 1e-6,
    normalize_by_std: bool = True,
) -> torch.Tensor:
    """Paper normalisation: A_i = (R_i - mean_g R) / (std_g R + eps) over the trajectories of group g.

    Shapes: rewards (n_traj,) float; group_index (n_traj,) long in [0, n_groups);
    turns_per_trajectory (n_traj,) long (unused here, kept for one signature) -> (n_traj,) float32.
    """
    del turns_per_trajectory
    return _normalise_in_groups(rewards, group_index, torch.ones_like(group_index), eps, normalize_by_std)


def turn_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    turns_per_trajectory: torch.Tensor,
    eps: float = 1e-6,
    normalize_by_std: bool = True,
) -> torch.Tensor:
    """Reference-code normalisation: statistics over all turn samples of the group (trajectory i's
    reward repeated T_i times); the result is per trajectory since all its turns share it.

    Shapes: as ``trajectory_advantages``; turns_per_trajectory (n_traj,) long >= 1 -> (n_traj,).
    """
    return _normalise_in_groups(rewards, group_index, turns_per_trajectory, eps, normalize_by_std)


AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]

ADVANTAGE_ESTIMATORS: dict[AdvantageMode, AdvantageEstimator] = {
    AdvantageMode.TRAJECTORY: trajectory_advantages,
    AdvantageMode.TURN: turn_advantages,
}


def uniform_groups(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Which groups carry no learning signal (all rewards equal, including groups of one).

    Shapes: rewards (n_traj,), group_index (n_traj,) long -> (n_groups,) bool.
    """
    n_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    values = rewards.to(torch.float64)
    high = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, group_index, values, reduce="amax"
    )
    low = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, group_index, values, reduce="amin"
    )
    return high == low
