"""The unit of training and evaluation data: one question with a verifiable answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from flowlane.api.enums import RewardKind
from flowlane.api.errors import ConfigError


class Split(StrEnum):
    TRAIN = "train"
    TEST = "test"  # held out: never trained on
    ALL = "all"  # every row of a user file (for evaluation-only data)


_SPLIT_ALIASES = {
    "train": Split.TRAIN,
    "training": Split.TRAIN,
    "test": Split.TEST,
    "held_out": Split.TEST,
    "held-out": Split.TEST,
    "heldout": Split.TEST,
    "eval": Split.TEST,
    "all": Split.ALL,
}


def reward_kinds() -> list[str]:
    return [kind.value for kind in RewardKind]


def resolve_kind(kind: str | RewardKind) -> RewardKind:
    """The reward kind for a name or alias; a ConfigError naming the choices otherwise."""
    try:
        return RewardKind(str(kind).strip().lower())
    except ValueError:
        raise ConfigError(f"unknown reward '{kind}'; available: {', '.join(reward_kinds())}") from None


def resolve_split(split: str | Split) -> Split:
    try:
        return _SPLIT_ALIASES[str(split).strip().lower()]
    except KeyError:
        raise ConfigError(
            f"unknown split '{split}'; use 'train', 'test' (alias 'held_out') or 'all'"
        ) from None


@dataclass(frozen=True)
class Task:
    id: str
    question: str
    answer: str  # the gold answer; for game24 one valid expression (any valid one scores)
    source: str  # the task set it came from (per-source metrics)
    reward: str = RewardKind.EXACT.value  # a reward registry name (flowlane.runtime.rewards)
    #: Extra facts a checker or test may use (game24 numbers, multihop gold passages).
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answer": self.answer, "source": self.source,
                "reward": self.reward, "meta": self.meta}
