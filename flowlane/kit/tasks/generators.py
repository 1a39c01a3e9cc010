"""Bundled task sets generated from a seed: multi-digit arithmetic and the Game of 24.

Both are generated in memory at load time (milliseconds), so no data file can drift from the
code. Python's ``random.Random`` (Mersenne Twister, ``randrange``/``shuffle`` built on
``getrandbits``) gives the same sequence for the same seed on every platform; tests pin the first
question of each split so that any change shows up.

Train and test are disjoint by construction: arithmetic test questions are generated from their
own seed and any that also occur in train are skipped; Game-of-24 number sets are shuffled once
and cut, the first part held out.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from functools import cache

from flowlane.api.enums import RewardKind
from flowlane.kit.tasks.task import Split, Task

ARITHMETIC_SIZES = {Split.TRAIN: 400, Split.TEST: 100}
GAME24_SIZES = {Split.TRAIN: 400, Split.TEST: 100}
_ARITHMETIC_SEEDS = {Split.TRAIN: 20251, Split.TEST: 20252}
_GAME24_SEED = 24


# -- arithmetic -------------------------------------------------------------------------------


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


def _arithmetic_expression(rng: random.Random) -> str:
    form = rng.randrange(6)
    if form == 0:
        return f"{_operand(rng, rng.randrange(3, 6))} + {_operand(rng, rng.randrange(3, 6))}"
    if form == 1:
        return f"{_operand(rng, rng.randrange(3, 6))} - {_operand(rng, rng.randrange(3, 6))}"
    if form == 2:
        return f"{_operand(rng, rng.randrange(2, 4))} * {_operand(rng, rng.randrange(2, 4))}"
    if form == 3:
        a, b, c = (_operand(rng, rng.randrange(2, 5)) for _ in range(3))
        return f"{a} + {b} - {c}"
    if form == 4:
        return f"{_operand(rng, 3)} * {_operand(rng, 2)} + {_operand(rng, 4)}"
    return f"{_operand(rng, 4)} - {_operand(rng, 2)} * {_operand(rng, 2)}"


def _evaluate_plain(expression: str) -> int:
    """Value of 'a op b [op c]' with the usual precedence (only + - * and integers)."""
    tokens = expression.split()
    terms: list[int] = [int(tokens[0])]
    signs: list[int] = [1]
    for op, value in zip(tokens[1::2], map(int, tokens[2::2]), strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


@cache
def _arithmetic_expressions(split: Split) -> tuple[str, ...]:
    taken = set(_arithmetic_expressions(Split.TRAIN)) if split is Split.TEST else set()
    rng = random.Random(_ARITHMETIC_SEEDS[split])
    out: list[str] = []
    while len(out) < ARITHMETIC_SIZES[split]:
        expression = _arithmetic_expression(rng)
        if expression not in taken:
            taken.add(expression)
            out.append(expression)
    return tuple(out)


def arithmetic_tasks(split: Split) -> list[Task]:
    return [
        Task(
            id=f"arithmetic-{split.value}-{i:04d}",
            question=f"What is {expression}?",
            answer=str(_evaluate_plain(expression)),
            source="arithmetic",
            reward=RewardKind.NUMERIC.value,
        )
        for i, expression in enumerate(_arithmetic_expressions(split))
    ]


# -- Game of 24 -------------------------------------------------------------------------------


@cache
def _reachable(numbers: tuple[int, ...]) -> dict[Fraction, str]:
    """Every value the sorted ``numbers`` can make (each used once), with one expression for it."""
    if len(numbers) == 1:
        return {Fraction(numbers[0]): str(numbers[0])}
    out: dict[Fraction, str] = {}
    for left, right in _splits(numbers):
        for a, ea in _reachable(left).items():
            for b, eb in _reachable(right).items():
                ea_, eb_ = _wrap(ea, left), _wrap(eb, right)
                out.setdefault(a + b, f"{ea_} + {eb_}")
                out.setdefault(a * b, f"{ea_} * {eb_}")
                out.setdefault(a - b, f"{ea_} - {eb_}")
                out.setdefault(b - a, f"{eb_} - {ea_}")
                if b:
                    out.setdefault(a / b, f"{ea_} / {eb_}")
                if a:
                    out.setdefault(b / a, f"{eb_} / {ea_}")
    return out


def _splits(numbers: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Ways to cut a sorted multiset into two non-empty parts (each unordered pair once)."""
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    index = range(len(numbers))
    for size in range(1, len(numbers) // 2 + 1):
        for chosen in itertools.combinations(index, size):
            left = tuple(numbers[i] for i in chosen)
            right = tuple(numbers[i] for i in index if i not in chosen)
            seen.add((left, right) if left <= right else (right, left))
    return sorted(seen)


def _wrap(expression: str, numbers: tuple[int, ...]) -> str:
    return expression if len(numbers) == 1 else f"({expression})"


def solve_24(numbers: list[int] | tuple[int, ...], target: int = 24) -> str | None:
    """One expression that makes ``target`` from ``numbers`` (each once, + - * /), or None.

    Meet in the middle: for each cut into two parts, look up the value the second part must
    make for each value the first part can make; sub-results are shared across calls.
    """
    goal = Fraction(target)
    for left, right in _splits(tuple(sorted(numbers))):
        right_values = _reachable(right)
        for a, ea in _reachable(left).items():
            ea = _wrap(ea, left)
            needed = [(goal - a, "{a} + {b}"), (a - goal, "{a} - {b}"), (a + goal, "{b} - {a}")]
            if a:
                needed += [(goal / a, "{a} * {b}"), (goal * a, "{b} / {a}")]
                if a / goal:  # b = a / 24 must not be 0
                    needed.append((a / goal, "{a} / {b}"))
            for b, template in needed:
                if b in right_values:
                    return template.format(a=ea, b=_wrap(right_values[b], right))
    return None


def game24_question(numbers: list[int] | tuple[int, ...]) -> str:
    shown = ", ".join(str(n) for n in numbers)
    return (
        f"Use the numbers {shown} to make 24. Use each number exactly once, with +, -, *, / and "
        "parentheses. Answer with the expression."
    )


@cache
def _game24_sets() -> dict[Split, tuple[tuple[tuple[int, ...], str], ...]]:
    combos = list(itertools.combinations_with_replacement(range(1, 14), 4))
    random.Random(_GAME24_SEED).shuffle(combos)
    solved: list[tuple[tuple[int, ...], str]] = []
    wanted = GAME24_SIZES[Split.TEST] + GAME24_SIZES[Split.TRAIN]
    for combo in combos:
        solution = solve_24(combo)
        if solution is not None:
            solved.append((combo, solution))
            if len(solved) == wanted:
                break
    cut = GAME24_SIZES[Split.TEST]
    return {Split.TEST: tuple(solved[:cut]), Split.TRAIN: tuple(solved[cut:])}


def game24_tasks(split: Split) -> list[Task]:
    return [
        Task(
            id=f"game24-{split.value}-{i:04d}",
            question=game24_question(numbers),
            answer=solution,
            source="game24",
            reward=RewardKind.GAME24.value,
            meta={"numbers": list(numbers)},
        )
        for i, (numbers, solution) in enumerate(_game24_sets()[split])
    ]
