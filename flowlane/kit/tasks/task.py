"""The unit of training and evaluation data: one question with a verifiable answer."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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


def carve_validation(tasks: Sequence[Task], fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """Split a training split into (training, validation): disjoint, deterministic and stable.

    Each task is ranked by a hash of ``seed`` and its id (and question), and the lowest-ranked
    ``round(fraction * n)`` (at least one when ``fraction`` > 0) form the validation split. A task's
    side depends only on its own id and the seed, not on the file's order; both parts keep the
    input order. At least one task stays for training.
    """
    if not 0.0 <= fraction <= 0.5:
        raise ConfigError(f"validation fraction: must be in [0, 0.5], got {fraction}")
    count = min(max(1, round(fraction * len(tasks))), len(tasks) - 1) if fraction > 0 and tasks else 0
    if count <= 0:
        return list(tasks), []

    def rank(task: Task) -> bytes:
        return hashlib.sha256(f"{seed}\0{task.id}\0{task.question}".encode()).digest()

    chosen = {id(task) for task in sorted(tasks, key=rank)[:count]}
    return [t for t in tasks if id(t) not in chosen], [t for t in tasks if id(t) in chosen]
