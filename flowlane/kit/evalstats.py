"""How sure an evaluation is: an interval for one accuracy, and for the gain between two on the same questions.

Held-out sets here are small (100 questions by default), so an accuracy of 0.60 could be anything
from about 0.50 to 0.69. Training is judged by the gain on the same questions before and after, and
a paired comparison is much tighter than two independent intervals: only the questions whose
outcome changed (fixed by training, or broken) carry information about the gain.

- :func:`wilson_interval` — the Wilson score interval for a binomial proportion (it stays inside
  [0, 1] and behaves at 0 and n successes, unlike the normal approximation).
- :func:`paired_gain` — the gain, its Wald interval for a difference of paired proportions, the
  counts of questions fixed and broken, and the exact McNemar test's two-sided p-value (a binomial
  test on the discordant pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``successes`` out of ``n`` (``(0.0, 1.0)`` when ``n`` is 0)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]: {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: under no effect each changed question is a fair coin."""
    changed = fixed + broken
    if changed == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(changed, i) for i in range(k + 1)) / 2.0 ** changed
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedGain:
    """Accuracy after minus before on the same ``n`` questions."""

    n: int
    before: float
    after: float
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    ci_low: float
    ci_high: float
    p_value: float  # exact McNemar, two-sided

    @property
    def gain(self) -> float:
        return self.after - self.before

    def metrics(self, prefix: str) -> dict[str, float]:
        """The MLflow metrics under ``prefix`` (e.g. ``test/gain``)."""
        return {prefix: self.gain, f"{prefix}_ci_low": self.ci_low, f"{prefix}_ci_high": self.ci_high,
                f"{prefix}_fixed": float(self.fixed), f"{prefix}_broken": float(self.broken),
                f"{prefix}_p_value": self.p_value}

    def describe(self) -> str:
        return (f"{self.gain:+.3f} (95% CI {self.ci_low:+.3f} to {self.ci_high:+.3f}; {self.fixed} questions "
                f"fixed, {self.broken} broken, McNemar p={self.p_value:.2g}, n={self.n})")


def paired_gain(before: Mapping[str, bool], after: Mapping[str, bool], z: float = Z95) -> PairedGain:
    """The gain from ``before`` to ``after``, each question id -> answered correctly; the ids must match."""
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))
        raise ValueError(f"before and after must score the same questions; {len(missing)} differ, "
                         f"e.g. {missing[0]!r}")
    n = len(before)
    if n == 0:
        raise ValueError("no questions to compare")
    fixed = sum(1 for key, ok in after.items() if ok and not before[key])
    broken = sum(1 for key, ok in after.items() if not ok and before[key])
    diff = (fixed - broken) / n
    # Var of the mean of d_i in {-1, 0, 1}: (E[d^2] - E[d]^2) / n, E[d^2] = (fixed + broken) / n.
    half = z * math.sqrt(max((fixed + broken) / n - diff * diff, 0.0) / n)
    return PairedGain(
        n=n, before=sum(before.values()) / n, after=sum(after.values()) / n, fixed=fixed, broken=broken,
        ci_low=max(-1.0, diff - half), ci_high=min(1.0, diff + half), p_value=mcnemar_exact_p(fixed, broken))
