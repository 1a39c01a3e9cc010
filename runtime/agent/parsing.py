"""Turning module outputs (planner, verifier, executor) into values, whatever the model wrote.

The reference AgentFlow code parses free text with regexes and silently degrades when a model
drifts from the format. Here every module asks for schema-constrained JSON when the engine can
enforce it, and every output still goes through the same ladder of recoveries, because engines
that ignore the schema (an HTTP endpoint, transformers) and truncated generations exist:

1. the whole output is a JSON object                               -> ``ParseMethod.JSON``
2. a JSON object inside prose, a code fence, or before junk        -> ``ParseMethod.EXTRACTED_JSON``
3. a truncated JSON object, closed by the parser                   -> ``ParseMethod.REPAIRED_JSON``
4. labelled text ("Sub-Goal: ... Tool Name: ...", "Conclusion: STOP") -> ``ParseMethod.LABELLED``
5. nothing usable: a safe default                                  -> ``ParseMethod.DEFAULT``

A result is *clean* when a JSON object was found whole (steps 1-2) and every field was valid as
written. Anything else (a repair, a labelled fallback, a fuzzy tool name, a missing field, a
default) is a parse failure that the agent counts in ``Trajectory.parse_failures`` and, for
planner turns, marks with ``PlannerTurn.parsed = False``. Everything here is pure.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from flowlane.api.trajectory import Verdict

T = TypeVar("T")


class ParseMethod(StrEnum):
    JSON = "json"
    EXTRACTED_JSON = "extracted_json"
    REPAIRED_JSON = "repaired_json"
    LABELLED = "labelled"
    DEFAULT = "default"


_WHOLE_JSON = (ParseMethod.JSON, ParseMethod.EXTRACTED_JSON)


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """A parsed value, how it was obtained, and what had to be fixed on the way."""

    value: T
    method: ParseMethod
    problems: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return self.method in _WHOLE_JSON and not self.problems


@dataclass(frozen=True)
class PlanStep:
    """The planner's decision for one turn."""

    justification: str
    context: str
    sub_goal: str
    tool_name: str


@dataclass(frozen=True)
class VerifierDecision:
    verdict: Verdict
    reason: str


# --------------------------------------------------------------------------------------------
# JSON objects in model text


def _loads_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)


def _close_truncated(fragment: str) -> dict[str, Any] | None:
    """Close a JSON object cut off mid-way (a generation that hit max_tokens).

    Tries the fragment with its open string and brackets closed; failing that, cuts back to the
    last member boundary (a comma outside strings) and closes there, so a half-written key or
    value is dropped while everything before it survives.
    """
    stack: list[str] = []
    in_string = False
    escaped = False
    cut_points: list[tuple[int, list[str]]] = []  # (index of a comma, bracket stack there)
    for i, ch in enumerate(fragment):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            if len(stack) == 1:
                cut_points.append((i + 1, list(stack)))
        elif ch in "}]":
            if not stack:
                return None
            stack.pop()
            if not stack:
                return _loads_object(fragment[: i + 1])
        elif ch == ",":
            cut_points.append((i, list(stack)))
    tail = fragment.rstrip()
    if escaped:
        tail = tail[:-1]
    closed = tail + ('"' if in_string else "") + "".join(reversed(stack))
    obj = _loads_object(closed)
    if obj is not None:
        return obj
    for index, open_brackets in reversed(cut_points):
        obj = _loads_object(fragment[:index] + "".join(reversed(open_brackets)))
        if obj is not None:
            return obj
    return None


def find_json_object(text: str) -> tuple[dict[str, Any], ParseMethod] | None:
    """The first JSON object in ``text`` and how it was found, or None."""
    stripped = text.strip()
    whole = _loads_object(stripped)
    if whole is not None:
        return whole, ParseMethod.JSON
    for fenced in _FENCE.findall(stripped):
        obj = _loads_object(fenced.strip())
        if obj is not None:
            return obj, ParseMethod.EXTRACTED_JSON
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", stripped):
        try:
            value, _ = decoder.raw_decode(stripped, match.start())
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value, ParseMethod.EXTRACTED_JSON
        # Not a whole object here: either braces in prose (closed, not JSON: keep looking) or an
        # object cut off at the end of the text, whose inner objects must not be mistaken for it.
        repaired = _close_truncated(stripped[match.start() :])
        if repaired:
            return repaired, ParseMethod.REPAIRED_JSON
    return None


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.strip().lower()).strip("_")


def _pick(obj: Mapping[str, Any], aliases: Sequence[str]) -> str | None:
    """The value of the first key matching one of ``aliases`` (after normalising), as text."""
    normalised = {_norm_key(k): v for k, v in obj.items()}
    for alias in aliases:
        if alias in normalised:
            value = normalised[alias]
            if value is None:
                return None
            return value if isinstance(value, str) else json.dumps(value)
    return None


# --------------------------------------------------------------------------------------------
# labelled text


def parse_labelled(text: str, labels: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Values of ``Label: value`` sections, keyed by field name.

    ``labels`` maps a field name to the label spellings that introduce it (case-insensitive;
    markdown bold, headings, bullets and numbering around a label are tolerated). A value runs
    until the next known label or the end of the text.
    """
    spelling_to_field: dict[str, str] = {}
    for field_name, spellings in labels.items():
        for spelling in spellings:
            spelling_to_field[_norm_key(spelling)] = field_name
    alternatives = sorted({s for spellings in labels.values() for s in spellings}, key=len, reverse=True)
    label_words = "|".join(re.escape(a).replace(r"\ ", r"[\s_-]*").replace(r"\-", r"[\s_-]*")
                           for a in alternatives)
    pattern = re.compile(
        rf"(?im)^[\s>*#\-\d.)]*\**\s*({label_words})\s*\**\s*:\s*\**"
    )
    matches = list(pattern.finditer(text))
    found: dict[str, str] = {}
    for i, match in enumerate(matches):
        field_of_label = spelling_to_field.get(_norm_key(match.group(1)))
        if field_of_label is None or field_of_label in found:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[match.end() : end].strip().strip("*").strip()
        if value:
            found[field_of_label] = value
    return found


# --------------------------------------------------------------------------------------------
# tool names


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def match_tool_name(raw: str, tool_names: Sequence[str]) -> tuple[str | None, bool]:
    """The tool ``raw`` refers to and whether it was named exactly (up to case and separators).

    Inexact matches: a tool name contained in ``raw`` ("the python tool") or the closest name by
    edit similarity ("pyhton"). Returns ``(None, False)`` when nothing is close.
    """
    wanted = _norm_name(raw)
    if not wanted:
        return None, False
    by_norm = {_norm_name(n): n for n in tool_names}
    if wanted in by_norm:
        return by_norm[wanted], True
    contained = [n for key, n in by_norm.items() if key and re.search(rf"(^|_){re.escape(key)}(_|$)", wanted)]
    if len(contained) == 1:
        return contained[0], False
    close = difflib.get_close_matches(wanted, list(by_norm), n=1, cutoff=0.6)
    if close:
        return by_norm[close[0]], False
    return None, False


def first_tool_mentioned(text: str, tool_names: Sequence[str]) -> str | None:
    """The tool whose name appears earliest in ``text`` as a whole word, or None."""
    best: tuple[int, str] | None = None
    for name in tool_names:
        match = re.search(rf"(?i)(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), name)
    return best[1] if best else None


# --------------------------------------------------------------------------------------------
# planner

PLAN_FIELDS: dict[str, tuple[str, ...]] = {
    "justification": ("justification", "reason", "reasoning", "rationale"),
    "context": ("context",),
    "sub_goal": ("sub_goal", "subgoal", "goal", "sub_task", "task"),
    "tool_name": ("tool_name", "tool", "toolname", "selected_tool"),
}
PLAN_LABELS: dict[str, tuple[str, ...]] = {
    "justification": ("Justification", "Reasoning", "Rationale"),
    "context": ("Context",),
    "sub_goal": ("Sub-Goal", "Sub Goal", "Subgoal", "Goal"),
    "tool_name": ("Tool Name", "Tool", "Selected Tool"),
}


def parse_plan(text: str, tool_names: Sequence[str], *, default_sub_goal: str = "") -> Parsed[PlanStep]:
    """The planner's step from its output; always a usable step with a real tool name.

    Fallbacks: labelled text for missing fields; a fuzzy tool name; the first tool mentioned
    anywhere in the text; the first tool. A missing sub-goal becomes ``default_sub_goal``.
    """
    if not tool_names:
        raise ValueError("parse_plan needs at least one tool name")
    problems: list[str] = []
    fields: dict[str, str] = {}
    method = ParseMethod.DEFAULT
    found = find_json_object(text)
    if found is not None:
        obj, method = found
        for name, aliases in PLAN_FIELDS.items():
            value = _pick(obj, aliases)
            if value is not None:
                fields[name] = value.strip()
    if not fields.get("sub_goal") or not fields.get("tool_name"):
        labelled = parse_labelled(text, PLAN_LABELS)
        if labelled.get("sub_goal") or labelled.get("tool_name"):
            method = ParseMethod.LABELLED
            for name, value in labelled.items():
                if not fields.get(name):
                    fields[name] = value

    raw_tool = fields.get("tool_name", "")
    tool, exact = match_tool_name(raw_tool.splitlines()[0] if raw_tool else "", tool_names)
    if tool is None:
        tool = first_tool_mentioned(text, tool_names) or tool_names[0]
        problems.append(f"unknown tool name {raw_tool!r}, using {tool!r}" if raw_tool else
                        f"no tool name, using {tool!r}")
    elif not exact:
        problems.append(f"tool name {raw_tool!r} matched to {tool!r}")
    sub_goal = fields.get("sub_goal", "")
    if not sub_goal:
        sub_goal = default_sub_goal
        problems.append("no sub-goal")
    if method is ParseMethod.DEFAULT:
        problems.append("no JSON object or labelled fields")
    step = PlanStep(
        justification=fields.get("justification", ""),
        context=fields.get("context", ""),
        sub_goal=sub_goal,
        tool_name=tool,
    )
    return Parsed(step, method, tuple(problems))


# --------------------------------------------------------------------------------------------
# verifier

VERDICT_FIELDS = ("conclusion", "verdict", "decision", "action")
REASON_FIELDS = ("reason", "analysis", "explanation", "justification", "reasoning")
VERIFIER_LABELS: dict[str, tuple[str, ...]] = {
    "conclusion": ("Conclusion", "Verdict", "Decision", "Final Determination"),
    "reason": ("Reason", "Analysis", "Explanation", "Justification"),
}
_VERDICT_WORD = re.compile(r"(?i)\b(STOP|CONTINUE)\b")


def _verdict_in(text: str) -> Verdict | None:
    """The last STOP/CONTINUE keyword in ``text`` (a conclusion comes after its reasoning)."""
    words = _VERDICT_WORD.findall(text)
    return Verdict(words[-1].upper()) if words else None


def parse_verdict(text: str, *, default: Verdict = Verdict.CONTINUE) -> Parsed[VerifierDecision]:
    """The verifier's STOP/CONTINUE decision and its reason; ``default`` when none is found."""
    found = find_json_object(text)
    if found is not None:
        obj, method = found
        raw = _pick(obj, VERDICT_FIELDS)
        reason = (_pick(obj, REASON_FIELDS) or "").strip()
        if raw is not None:
            verdict = _verdict_in(raw)
            if verdict is not None:
                exact = raw.strip().upper() == verdict.value
                problems = () if exact else (f"conclusion {raw!r} read as {verdict.value}",)
                return Parsed(VerifierDecision(verdict, reason), method, problems)
        stop_flag = obj.get("stop")
        if isinstance(stop_flag, bool):
            verdict = Verdict.STOP if stop_flag else Verdict.CONTINUE
            return Parsed(VerifierDecision(verdict, reason), method, ("boolean 'stop' field",))
    labelled = parse_labelled(text, VERIFIER_LABELS)
    conclusion = labelled.get("conclusion")
    if conclusion is not None:
        verdict = _verdict_in(conclusion)
        if verdict is not None:
            return Parsed(VerifierDecision(verdict, labelled.get("reason", "")), ParseMethod.LABELLED)
    verdict = _verdict_in(text)
    if verdict is not None:
        return Parsed(VerifierDecision(verdict, text.strip()[:500]), ParseMethod.LABELLED,
                      ("bare STOP/CONTINUE keyword",))
    return Parsed(VerifierDecision(default, "unparseable verifier output"), ParseMethod.DEFAULT,
                  ("no conclusion",))


# --------------------------------------------------------------------------------------------
# executor

COMMAND_FIELDS = ("command", "code", "query", "input", "expression", "prompt")
_COMMAND_LABEL = {"command": ("Command", "Code", "Query", "Input")}


def parse_command(text: str, fields: Sequence[str] = ("command",)) -> Parsed[str]:
    """The tool command from the executor's output.

    ``fields`` are the tool's own input-schema property names, tried before the usual ones.
    Fallbacks: a labelled ``Command:`` line, a fenced code block, the whole text. An empty
    output gives an empty command (``DEFAULT``); the caller decides what to run instead.
    """
    aliases = tuple(dict.fromkeys([*(_norm_key(f) for f in fields), *COMMAND_FIELDS]))
    found = find_json_object(text)
    if found is not None:
        obj, method = found
        value = _pick(obj, aliases)
        if value is not None and value.strip():
            return Parsed(value.strip(), method)
        strings = [v for v in obj.values() if isinstance(v, str) and v.strip()]
        if len(strings) == 1:
            return Parsed(strings[0].strip(), method, ("command under an unexpected key",))
    fenced = [f.strip() for f in _FENCE.findall(text) if f.strip()]
    if fenced:
        return Parsed(fenced[0], ParseMethod.LABELLED, ("code fence instead of JSON",))
    labelled = parse_labelled(text, _COMMAND_LABEL).get("command")
    if labelled:
        return Parsed(labelled, ParseMethod.LABELLED, ("labelled command",))
    stripped = text.strip()
    return Parsed(stripped, ParseMethod.DEFAULT, ("whole output used as command" if stripped else "empty output",))
