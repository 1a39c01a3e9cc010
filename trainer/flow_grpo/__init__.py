"""Flow-GRPO as pure tensor functions: advantages, the clipped loss, KL, importance weights, diagnostics.

One concern per module; each estimator or averaging rule is a plain function with documented
tensor shapes, selected by name from a small registry. Nothing here does I/O, touches a config
object or knows about distributed training: the learner (``flowlane.trainer.learner``) is the
shell that feeds these functions tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

import torch

from flowlane.api.errors import ConfigError
from flowlane.trainer.flow_grpo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageMode,
    trajectory_advantages,
    turn_advantages,
    uniform_groups,
)
from flowlane.trainer.flow_grpo.diagnostics import (
    advantage_stats,
    approx_kl,
    clip_fractions,
    entropy_from_log_probs,
    entropy_from_logits,
)
from flowlane.trainer.flow_grpo.importance import truncated_importance_weights
from flowlane.trainer.flow_grpo.kl import KL_ESTIMATORS, KLEstimator, kl_k1, kl_k3
from flowlane.trainer.flow_grpo.losses import (
    AGGREGATIONS,
    Aggregation,
    AggregationWeights,
    PolicyLossTerms,
    aggregate,
    clipped_policy_loss,
    paper_weights,
    token_mean_weights,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdvantageMode",
    "Aggregation",
    "KLEstimator",
    "PolicyLossTerms",
    "advantage_stats",
    "aggregate",
    "approx_kl",
    "clip_fractions",
    "clipped_policy_loss",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "get_advantage_estimator",
    "get_aggregation",
    "get_kl_estimator",
    "kl_k1",
    "kl_k3",
    "paper_weights",
    "token_mean_weights",
    "trajectory_advantages",
    "truncated_importance_weights",
    "turn_advantages",
    "uniform_groups",
]

E = TypeVar("E", bound=StrEnum)
F = TypeVar("F")


def _lookup(registry: dict[E, F], kind: type[E], name: str, what: str) -> F:
    try:
        return registry[kind(name)]
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {choices}") from None


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The advantage function registered as ``name`` (``trajectory`` or ``turn``)."""
    return _lookup(ADVANTAGE_ESTIMATORS, AdvantageMode, name, "advantage mode")


def get_aggregation(name: str) -> AggregationWeights:
    """The token-weight function registered as ``name`` (``paper`` or ``tokenMean``)."""
    return _lookup(AGGREGATIONS, Aggregation, name, "loss aggregation")


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-token KL estimator registered as ``name`` (``k1`` or ``k3``)."""
    return _lookup(KL_ESTIMATORS, KLEstimator, name, "KL estimator")
