"""Prompts and output schemas of the four modules, as pure functions of their inputs.

Kept short on purpose: the bundled planner is a 135M-parameter model, so every instruction that
does not change its choice is noise, and the planner prompt (question, analysis, 3-5 tool cards,
memory) must stay well under ~1500 tokens. The JSON schemas are what schema-constrained
decoding enforces; the prompts still spell out the expected JSON so that engines which ignore
the schema usually produce something ``parsing`` can read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from flowlane.runtime.agent.memory import truncate
from flowlane.runtime.engines.base import SamplingSettings

Messages = list[dict[str, str]]


class Module(StrEnum):
    """The agent's modules; also the keys of ``Trajectory.parse_failures``."""

    ANALYSIS = "query_analysis"
    PLANNER = "planner"
    EXECUTOR = "executor"
    VERIFIER = "verifier"
    GENERATOR = "generator"


def _messages(system: str, user: str) -> Messages:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_tool_card(card: Mapping[str, Any], max_value_chars: int = 120) -> str:
    """One tool as a prompt line: ``- name: description (key: value; ...)``."""
    name = card.get("name", "?")
    description = truncate(str(card.get("description", "")), max_value_chars)
    extras = []
    for key, value in card.items():
        if key in ("name", "description") or value in (None, "", [], {}):
            continue
        text = "; ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        extras.append(f"{key.replace('_', ' ')}: {truncate(text, max_value_chars)}")
    line = f"- {name}: {description}"
    return line + (f" ({'; '.join(extras)})" if extras else "")


def render_tool_cards(cards: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(render_tool_card(card) for card in cards)


# --------------------------------------------------------------------------------------------
# query analysis (fixed LLM, once per trajectory)


def _history_block(history: str) -> str:
    """The earlier turns of a conversation ahead of a prompt's question ("" outside a chat)."""
    return f"Conversation so far:\n{history}\n" if history.strip() else ""


def _instructions_line(instructions: str) -> str:
    return f"\n\nThe user's instructions: {instructions.strip()}" if instructions.strip() else ""


def query_analysis_messages(question: str, cards: Sequence[Mapping[str, Any]], *, history: str = "") -> Messages:
    names = ", ".join(str(card.get("name")) for card in cards)
    return _messages(
        "You analyze questions for an assistant that can use tools. Be brief and do not answer.",
        f"{_history_block(history)}"
        f"Question: {question}\n"
        f"Available tools: {names}\n"
        "In one or two sentences: what does the question ask for, and does it need a "
        "calculation, a fact lookup, or writing?",
    )


# --------------------------------------------------------------------------------------------
# planner (the trained module)


#: Max characters of each planner text field. Schema-constrained decoding enforces it, which
#: keeps a rambling small model from spending its whole token budget before naming a tool.
PLANNER_FIELD_MAX_CHARS = 200

#: One worked planner step per built-in tool, shown as a prior exchange (few-shot). Small models
#: copy placeholder text ("why this tool now") verbatim; a concrete example of a *different*
#: question teaches the format and the kind of sub-goal without giving away an answer.
PLANNER_EXAMPLES: dict[str, tuple[str, dict[str, str]]] = {
    "python": ("What is 15% of 80?", {
        "justification": "This needs an exact calculation.", "context": "",
        "sub_goal": "Compute 15% of 80 and print the result.", "tool_name": "python"}),
    "search": ("Who painted the Mona Lisa?", {
        "justification": "This needs a fact about a named work.", "context": "",
        "sub_goal": "Find who painted the Mona Lisa.", "tool_name": "search"}),
    "generator": ("Say 'the cat sat' in French.", {
        "justification": "This needs language, not facts or computation.", "context": "",
        "sub_goal": "Translate 'the cat sat' into French.", "tool_name": "generator"}),
}
MAX_PLANNER_EXAMPLES = 2


def planner_schema(tool_names: Sequence[str]) -> dict[str, Any]:
    """The planner's output: why, what the tool needs to know, what to do, which tool."""
    text = {"type": "string", "maxLength": PLANNER_FIELD_MAX_CHARS}
    return {
        "type": "object",
        "properties": {
            "justification": dict(text),
            "context": dict(text),
            "sub_goal": dict(text),
            "tool_name": {"type": "string", "enum": list(tool_names)},
        },
        "required": ["justification", "context", "sub_goal", "tool_name"],
        "additionalProperties": False,
    }


def _planner_request(question: str, memory_text: str, turn: int, max_turns: int, analysis: str | None,
                     history: str = "") -> str:
    # The question comes last, next to the instruction: small models weigh recent text most, and
    # a wandering analysis must not push the question out of view.
    lines = [_history_block(history).rstrip("\n")] if history.strip() else []
    if analysis is not None:
        lines.append(f"Analysis: {truncate(analysis, 300) or '(none)'}")
    lines += [f"Steps so far:\n{memory_text}", f"Question: {question}",
              f"Turn {turn} of {max_turns}. Plan the next step in JSON."]
    return "\n".join(lines)


def planner_messages(
    question: str,
    analysis: str,
    cards: Sequence[Mapping[str, Any]],
    memory_text: str,
    *,
    turn: int,
    max_turns: int,
    history: str = "",
    instructions: str = "",
) -> Messages:
    """System (role, tools, the user's instructions), up to two worked examples, the request."""
    names = [str(card.get("name")) for card in cards]
    messages = [{
        "role": "system",
        "content": "You are the planner of an assistant that answers questions with tools. Each turn "
        "you choose ONE tool and give it one small, concrete sub-goal. Reply with JSON: "
        "justification, context (facts from earlier steps the tool needs), sub_goal, tool_name "
        f"(one of: {', '.join(names)}).\n\nTools:\n{render_tool_cards(cards)}{_instructions_line(instructions)}",
    }]
    examples = [PLANNER_EXAMPLES[name] for name in names if name in PLANNER_EXAMPLES][:MAX_PLANNER_EXAMPLES]
    for example_question, example_step in examples:
        messages.append({"role": "user", "content": _planner_request(
            example_question, "(no steps yet)", 1, max_turns, None)})
        messages.append({"role": "assistant", "content": json.dumps(example_step)})
    messages.append({"role": "user", "content": _planner_request(
        question, memory_text, turn, max_turns, analysis, history)})
    return messages


# --------------------------------------------------------------------------------------------
# executor (fixed LLM): sub-goal -> tool command


def command_fields(input_schema: Mapping[str, Any]) -> list[str]:
    """The property names of a tool's input schema, required ones first."""
    properties = list(input_schema.get("properties", {}) or {})
    required = [p for p in input_schema.get("required", []) or [] if p in properties]
    return required + [p for p in properties if p not in required] or ["command"]


def executor_messages(
    question: str,
    card: Mapping[str, Any],
    command_instruction: str,
    input_schema: Mapping[str, Any],
    *,
    sub_goal: str,
    context: str,
    history: str = "",
) -> Messages:
    # No tool description here: small models copy it into the command. The sub-goal comes last.
    example = json.dumps({name: "..." for name in command_fields(input_schema)})
    lines = [f"{_history_block(history)}Question: {question}"]
    if context.strip():
        lines.append(f"Context: {truncate(context, 600)}")
    lines += [f"Sub-goal: {sub_goal}", "", f"Reply with JSON only: {example}"]
    return _messages(
        f"You write one command for the {card.get('name')} tool. {command_instruction}",
        "\n".join(lines),
    )


# --------------------------------------------------------------------------------------------
# verifier (fixed LLM): STOP or CONTINUE

VERIFIER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": PLANNER_FIELD_MAX_CHARS},
        "conclusion": {"type": "string", "enum": ["STOP", "CONTINUE"]},
    },
    "required": ["reason", "conclusion"],
    "additionalProperties": False,
}


def verifier_messages(question: str, analysis: str, memory_text: str, *, history: str = "") -> Messages:
    return _messages(
        "You check whether the steps taken so far are enough to answer a question.",
        f"{_history_block(history)}"
        f"Question: {question}\n"
        f"Analysis: {truncate(analysis, 400) or '(none)'}\n\n"
        f"Steps so far:\n{memory_text}\n\n"
        "Do the results above contain the answer to the question? Reply with JSON with two fields: "
        '"reason", a short sentence about the results, and "conclusion": "STOP" if the results '
        'answer the question, "CONTINUE" if more steps are needed.',
    )


# --------------------------------------------------------------------------------------------
# solution generator (fixed LLM)


def generator_messages(question: str, memory_text: str, *, history: str = "", instructions: str = "") -> Messages:
    # The user's instructions come twice: in the system message, where chat models look for them,
    # and as the last line, which a small model weighs most.
    closing = ("Answer the question using these results. Be concise and end with the final answer."
               if not instructions.strip() else
               f"Answer the question using these results. Follow these instructions: {instructions.strip()}")
    return _messages(
        "You answer questions using the results of the steps an assistant took."
        + _instructions_line(instructions),
        f"{_history_block(history)}"
        f"Question: {question}\n\n"
        f"Steps and results:\n{memory_text}\n\n"
        f"{closing}",
    )


# --------------------------------------------------------------------------------------------
# sampling settings per request


def request_settings(
    base: SamplingSettings, *, schema: dict[str, Any] | None, structured: bool, seed: int | None
) -> SamplingSettings:
    """``base`` with the output schema (when the engine enforces schemas) and a per-call seed."""
    return dataclasses.replace(base, json_schema=schema if structured else None,
                               seed=seed if seed is not None else base.seed)


def call_seed(trajectory_seed: int | None, module: Module, turn: int) -> int | None:
    """A distinct, reproducible seed for each module call of a seeded trajectory."""
    if trajectory_seed is None:
        return None
    offset = list(Module).index(module)
    return (trajectory_seed * 1009 + turn * 17 + offset) % (2**31 - 1)
