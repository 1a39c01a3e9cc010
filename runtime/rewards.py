"""Rewards: is the agent's final answer right? 1.0 or 0.0, by a named checker.

Flow-GRPO gives every planner turn of a trajectory the trajectory's final outcome, so the reward
must be cheap, deterministic and hard to game. The paper uses an LLM judge; here the offline
checkers are the default and the judge is an option:

- ``exact`` (also ``exact_match``): the answers are equal after normalising case, whitespace, punctuation and
  English articles ("The Sallow." == "sallow").
- ``numeric``: the first number after an answer marker (or the last number in the text) equals
  the gold number within a tolerance; thousands separators are understood ("1,234").
- ``game24``: the answer is an arithmetic expression using exactly the task's four numbers, each
  once, with + - * / and parentheses, that evaluates to 24 in exact fractions. It is parsed with
  ``ast`` and walked node by node: nothing is ever evaluated by Python, so "__import__('os')"
  is just an invalid answer. Division by zero is an invalid answer too; the checker never raises.
- ``choice``: the option letter (A-E) of a multiple-choice answer.
- ``judge`` (also ``llm_judge``): an ``LLMEngine`` decides whether the prediction means the same as the gold
  answer (async; use ``LLMJudge`` or ``ascore``).

Predictions are usually a generator's whole text; ``extract_final_answer`` finds the answer in
it ("Answer: ...", ``\\boxed{...}``, "the answer is ..."). Scorers accept any task-like object
with ``question`` and ``answer`` (a ``flowlane.kit.tasks.Task`` or a gRPC task message).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

from flowlane.api.enums import RewardKind
from flowlane.api.errors import ConfigError
from flowlane.kit.tasks.task import resolve_kind, reward_kinds  # task files name their reward too

if TYPE_CHECKING:  # the engine module imports torch; offline rewards must load without it
    from flowlane.runtime.engines.base import LLMEngine, SamplingSettings

__all__ = [
    "LLMJudge",
    "RewardKind",
    "ascore",
    "check_game24",
    "extract_final_answer",
    "game24_numbers",
    "normalize_answer",
    "parse_number",
    "reward_kinds",
    "score",
]


class TaskLike(Protocol):
    """What a reward reads from a task; read-only, so frozen tasks and gRPC messages both fit."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...


# --------------------------------------------------------------------------------------------
# Finding the answer in a generator's text.

_MARKERS = [
    re.compile(r"\b(?:final answer|answer)\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE),
    re.compile(r"\bthe (?:final )?answer is\s*[:=]?\s*(.+)", re.IGNORECASE),
]


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _find_marked_answer(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    matches = [m for pattern in _MARKERS for m in pattern.finditer(text)]
    if not matches:
        return None
    last = max(matches, key=lambda m: m.start(1))
    return last.group(1).strip().splitlines()[0].strip()


def extract_final_answer(text: str) -> str:
    """The answer part of ``text``: the last ``\\boxed{}``, else after the last "Answer:" or "the
    answer is", else the whole text stripped."""
    marked = _find_marked_answer(text)
    return marked if marked is not None else text.strip()


# --------------------------------------------------------------------------------------------
# exact_match

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact_match(prediction: str, task: TaskLike) -> float:
    return float(normalize_answer(extract_final_answer(prediction)) == normalize_answer(str(task.answer)))


# --------------------------------------------------------------------------------------------
# numeric

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(text: str, *, last: bool = False) -> float | None:
    """The first (or last) number in ``text``; "1,234.5" reads as 1234.5. None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float((found[-1] if last else found[0]).replace(",", ""))
    except ValueError:
        return None


def _numeric(prediction: str, task: TaskLike, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    gold = parse_number(str(task.answer))
    if gold is None:  # not a numeric task after all: fall back to exact match
        return _exact_match(prediction, task)
    marked = _find_marked_answer(prediction)
    value = parse_number(marked) if marked is not None else parse_number(prediction, last=True)
    if value is None or not math.isfinite(value):
        return 0.0
    return float(math.isclose(value, gold, rel_tol=rel_tol, abs_tol=abs_tol))


# --------------------------------------------------------------------------------------------
# game24

_GAME24_NUMBERS = re.compile(r"numbers?\s*:?\s*((?:\d+\s*(?:,|and)?\s*){4})", re.IGNORECASE)
_MAX_EXPRESSION_CHARS = 200
_OPERATORS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def game24_numbers(question: str) -> list[int] | None:
    """The four numbers of a Game-of-24 question ("... the numbers 4, 7, 8, 8 ...")."""
    match = _GAME24_NUMBERS.search(question)
    if not match:
        return None
    numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
    return numbers if len(numbers) == 4 else None


class _Invalid(Exception):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _OPERATORS:
            raise _Invalid(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Invalid("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    raise _Invalid(f"{type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")


def check_game24(expression: str, numbers: list[int], target: int = 24) -> tuple[bool, str]:
    """Whether ``expression`` makes ``target`` from ``numbers`` (each exactly once), and why not."""
    expr = expression.strip().rstrip(".").replace("×", "*").replace("÷", "/").replace("−", "-")
    expr = re.sub(r"\s*=\s*-?\d+\s*$", "", expr)  # a trailing "= 24"
    if not expr:
        return False, "empty expression"
    if len(expr) > _MAX_EXPRESSION_CHARS:
        return False, f"expression longer than {_MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expr, mode="eval")
        used: list[int] = []
        value = _evaluate(tree, used)
    except _Invalid as exc:
        return False, str(exc)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False, "not an arithmetic expression"
    if Counter(used) != Counter(numbers):
        return False, f"uses {sorted(used)}, must use each of {sorted(numbers)} exactly once"
    if value != target:
        return False, f"evaluates to {value}, not {target}"
    return True, "ok"


def _game24(prediction: str, task: TaskLike) -> float:
    meta = getattr(task, "meta", None) or {}
    numbers = meta.get("numbers") or game24_numbers(str(task.question))
    if not numbers:
        return 0.0
    candidate = extract_final_answer(prediction)
    return float(check_game24(candidate, list(numbers))[0])


# --------------------------------------------------------------------------------------------
# choice

_CHOICE = re.compile(r"\s*(?:option\s+)?\(?([A-Ea-e])\)?(?:[\W_]|$)", re.IGNORECASE)


def _choice(prediction: str, task: TaskLike) -> float:
    gold = _CHOICE.match(str(task.answer))
    found = _CHOICE.match(extract_final_answer(prediction))
    return float(bool(gold and found and gold.group(1).upper() == found.group(1).upper()))


# --------------------------------------------------------------------------------------------
# the registry

_SCORERS: dict[RewardKind, Callable[[str, TaskLike], float]] = {
    RewardKind.EXACT: _exact_match,
    RewardKind.NUMERIC: _numeric,
    RewardKind.GAME24: _game24,
    RewardKind.CHOICE: _choice,
}


def score(kind: str | RewardKind, prediction: str | None, task: TaskLike) -> float:
    """1.0 when ``prediction`` answers ``task`` correctly under reward ``kind``, else 0.0.

    Offline kinds only; ``judge`` needs an engine: use ``ascore`` with an ``LLMJudge``.
    """
    resolved = resolve_kind(kind)
    if resolved is RewardKind.JUDGE:
        raise ConfigError("reward 'judge' needs a judge model: call ascore(..., judge=LLMJudge(engine))")
    if not prediction or not prediction.strip():
        return 0.0
    return _SCORERS[resolved](prediction, task)


_JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["CORRECT", "INCORRECT"]}},
    "required": ["verdict"],
}


@dataclass
class LLMJudge:
    """Asks an LLM whether a prediction means the same as the gold answer (the paper's reward)."""

    engine: LLMEngine
    settings: SamplingSettings | None = None  # default: 16 tokens, temperature 0

    def messages(self, prediction: str, task: TaskLike) -> list[dict[str, str]]:
        return [
            {
                "role": "system",
                "content": "You grade answers. Decide whether the response gives the same final answer as "
                "the reference (same meaning, same number, same option). Reply with CORRECT or INCORRECT.",
            },
            {
                "role": "user",
                "content": f"Question: {task.question}\nReference answer: {task.answer}\n"
                f"Response: {extract_final_answer(prediction)}\n\nVerdict (CORRECT or INCORRECT):",
            },
        ]

    async def __call__(self, prediction: str, task: TaskLike) -> float:
        from flowlane.runtime.engines.base import SamplingSettings

        settings = self.settings or SamplingSettings(max_tokens=16, temperature=0.0)
        if self.engine.supports_structured_output:
            settings = dataclasses.replace(settings, max_tokens=max(settings.max_tokens, 16),
                                           json_schema=_JUDGE_SCHEMA)  # fmt: skip
        generation = await self.engine.chat(self.messages(prediction, task), settings)
        return float(_parse_verdict(generation.text))


def _parse_verdict(text: str) -> bool:
    """True for CORRECT; anything unclear counts as incorrect (the reward must not be gamed)."""
    try:
        data: Any = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("verdict", ""))
    except ValueError:
        pass
    words = re.findall(r"[A-Za-z]+", text.upper())
    return bool(words) and words[0] == "CORRECT"


async def ascore(
    kind: str | RewardKind, prediction: str | None, task: TaskLike, *, judge: LLMJudge | None = None
) -> float:
    """``score`` for every kind, ``judge`` included (it needs ``judge``)."""
    resolved = resolve_kind(kind)
    if resolved is not RewardKind.JUDGE:
        return score(resolved, prediction, task)
    if judge is None:
        raise ConfigError("reward 'judge' needs a judge model: pass judge=LLMJudge(engine)")
    if not prediction or not prediction.strip():
        return 0.0
    return await judge(prediction, task)
