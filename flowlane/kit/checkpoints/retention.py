"""Which checkpoints to keep: the newest ``keep_last`` and the best by metric. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from enum import StrEnum


class BestMode(StrEnum):
    """Which metric value is the best checkpoint's: the highest (reward) or the lowest (loss)."""

    MAX = "max"
    MIN = "min"


def pick_best(metrics: Mapping[int, float | None], mode: BestMode) -> int | None:
    """The step with the best finite metric (ties go to the newer step), or None."""
    scored = [(m, s) for s, m in metrics.items() if m is not None and math.isfinite(m)]
    if not scored:
        return None
    if mode is BestMode.MAX:
        return max(scored)[1]
    return min(scored, key=lambda ms: (ms[0], -ms[1]))[1]


def select_retained(
    metrics: Mapping[int, float | None], keep_last: int, mode: BestMode, must_keep: Iterable[int] = ()
) -> set[int]:
    """The steps retention keeps: the newest ``keep_last``, the best by metric, and ``must_keep``."""
    keep = set(sorted(metrics)[-keep_last:]) | set(must_keep)
    best = pick_best(metrics, mode)
    if best is not None:
        keep.add(best)
    return keep
