"""Preparing a learner step, pure (no model): the scored trajectories grouped by question, each
group's advantages broadcast to its planner turns (``TurnSample``), the turns split into the step's
optimizer updates (``PreparedBatch``, ``prepare_batch``), and an update's per-token loss weights
(``token_weights``).

How an update's turns are then laid out in micro-batches is ``flowlane.trainer.batching``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flowlane.api.errors import FlowlaneError
from flowlane.api.trajectory import Trajectory
from flowlane.trainer import flow_grpo


@dataclass(frozen=True)
class TurnSample:
    """One planner turn as the loss sees it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]
    policy_version: int
    advantage: float
    trajectory: int  # index of its trajectory within the update
    json_schema: str = ""  # the schema it was sampled under ("" unconstrained); scored under its mask


@dataclass
class PreparedBatch:
    """The trainable part of a step's trajectories, split into optimizer updates."""

    updates: list[list[TurnSample]] = field(default_factory=list)  # one list per mini-batch
    groups: int = 0
    groups_uniform: int = 0
    groups_skipped: int = 0
    trajectories: int = 0
    turns: int = 0
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # per trained trajectory
    reward_mean: float = 0.0


def prepare_batch(
    trajectories: Sequence[Trajectory],
    advantage_mode: flow_grpo.AdvantageMode,
    advantage_eps: float,
    normalize_std: bool,
    skip_uniform_groups: bool,
    mini_batches: int = 1,
) -> PreparedBatch:
    """Group, score and flatten trajectories into turn samples; pure, no model involved."""
    groups: dict[str, list[Trajectory]] = {}
    for position, trajectory in enumerate(trajectories):
        if trajectory.reward is None:
            raise FlowlaneError(
                f"trajectory {position} (question_id={trajectory.question_id!r}) has no reward; "
                "score trajectories before sending them to the learner"
            )
        groups.setdefault(trajectory.question_id or trajectory.question, []).append(trajectory)
    prepared = PreparedBatch(groups=len(groups))
    if not groups:
        return prepared
    ordered = list(groups.values())
    flat = [t for group in ordered for t in group]
    group_index = torch.tensor([g for g, group in enumerate(ordered) for _ in group], dtype=torch.long)
    rewards = torch.tensor([float(t.reward or 0.0) for t in flat], dtype=torch.float64)
    turns = torch.tensor([len(t.planner_turns) for t in flat], dtype=torch.long)
    prepared.reward_mean = float(rewards.mean().item())
    uniform = flow_grpo.uniform_groups(rewards, group_index)
    prepared.groups_uniform = int(uniform.sum().item())
    estimator = flow_grpo.ADVANTAGE_ESTIMATORS[advantage_mode]
    advantages = estimator(rewards, group_index, turns, advantage_eps, normalize_std)

    keep = [g for g in range(len(ordered)) if not (skip_uniform_groups and bool(uniform[g]))]
    prepared.groups_skipped = len(ordered) - len(keep)
    n_updates = max(1, min(mini_batches, len(keep)))
    chunks = [keep[i * len(keep) // n_updates : (i + 1) * len(keep) // n_updates] for i in range(n_updates)]
    kept_advantages: list[float] = []
    starts = list(itertools.accumulate((len(group) for group in ordered), initial=0))  # group -> first in flat
    for chunk in chunks:
        samples: list[TurnSample] = []
        trajectory_in_update = 0
        for g in chunk:
            for k, trajectory in enumerate(ordered[g]):
                advantage = float(advantages[starts[g] + k].item())
                kept_advantages.append(advantage)
                trained = [turn for turn in trajectory.planner_turns if turn.response_ids]
                for turn in trained:
                    samples.append(
                        TurnSample(
                            prompt_ids=turn.prompt_ids,
                            response_ids=turn.response_ids,
                            behaviour_logprobs=turn.logprobs,
                            policy_version=turn.policy_version,
                            advantage=advantage,
                            trajectory=trajectory_in_update,
                            json_schema=turn.json_schema,
                        )
                    )
                trajectory_in_update += bool(trained)
                prepared.trajectories += 1
        prepared.turns += len(samples)
        if samples:
            prepared.updates.append(samples)
    prepared.advantages = torch.tensor(kept_advantages, dtype=torch.float32)
    return prepared


def token_weights(samples: Sequence[TurnSample], aggregation: flow_grpo.Aggregation) -> list[torch.Tensor]:
    """Per-token loss weights of each sample for the whole update (see ``flow_grpo.losses``)."""
    token_turn = torch.cat(
        [torch.full((len(s.response_ids),), i, dtype=torch.long) for i, s in enumerate(samples)]
    )
    turn_trajectory = torch.tensor([s.trajectory for s in samples], dtype=torch.long)
    weights = flow_grpo.AGGREGATIONS[aggregation](token_turn, turn_trajectory)
    return list(torch.split(weights, [len(s.response_ids) for s in samples]))
