"""The Action Planner: the one trainable module, and the query analysis it starts from.

Each planner call goes through the *planner engine* (the policy being trained) and leaves a
``PlannerTurn`` holding exactly what that engine reported: prompt token ids, generated token ids,
their sampling log-probs and the policy version. Flow-GRPO trains on these lists as they are;
nothing here re-tokenizes text. The planner's decision itself (justification, context, sub-goal,
tool name) is parsed from the text, schema-constrained when the engine supports it; whether that
parse was clean is recorded on the turn (``parsed``), so a learner can see format failures.

Query analysis runs once per trajectory on the *fixed* engine: it is context for the planner,
not a planner action, so it is not trained and leaves no ``PlannerTurn``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowlane.api.trajectory import PlannerTurn
from flowlane.runtime.agent.parsing import Parsed, PlanStep, parse_plan
from flowlane.runtime.agent.prompts import (
    Module,
    call_seed,
    planner_messages,
    planner_schema,
    query_analysis_messages,
    request_settings,
)
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings


@dataclass
class PlannerOutput:
    parsed: Parsed[PlanStep]
    turn: PlannerTurn
    generation: Generation

    @property
    def step(self) -> PlanStep:
        return self.parsed.value


def planner_turn_from(generation: Generation, *, exact_ids: bool, parsed: bool) -> PlannerTurn:
    """The training record of one planner generation, taken from the engine's lists as they are.

    An engine that does not report token ids (``exact_ids`` False, e.g. a text-only HTTP
    endpoint) leaves empty lists rather than anything reconstructed: such turns serve answers
    but must never be trained on.
    """
    if not exact_ids:
        return PlannerTurn([], [], [], generation.policy_version, generation.text, parsed)
    return PlannerTurn(
        prompt_ids=list(generation.prompt_ids),
        response_ids=list(generation.token_ids),
        logprobs=list(generation.logprobs),
        policy_version=generation.policy_version,
        text=generation.text,
        parsed=parsed,
        json_schema=generation.json_schema,
    )


class Planner:
    def __init__(self, engine: LLMEngine, settings: SamplingSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def plan(
        self,
        question: str,
        analysis: str,
        cards: Sequence[Mapping[str, Any]],
        memory_text: str,
        *,
        turn: int,
        max_turns: int,
        seed: int | None = None,
        history: str = "",
        instructions: str = "",
    ) -> PlannerOutput:
        names = [str(card["name"]) for card in cards]
        messages = planner_messages(question, analysis, cards, memory_text, turn=turn, max_turns=max_turns,
                                    history=history, instructions=instructions)
        settings = request_settings(
            self.settings,
            schema=planner_schema(names),
            structured=self.engine.supports_structured_output,
            seed=call_seed(seed, Module.PLANNER, turn),
        )
        generation = await self.engine.chat(messages, settings)
        parsed = parse_plan(generation.text, names, default_sub_goal=question)
        record = planner_turn_from(generation, exact_ids=self.engine.reports_token_ids, parsed=parsed.clean)
        return PlannerOutput(parsed, record, generation)


class QueryAnalyzer:
    """Reads the question once: what is asked, what is needed, which tools may help."""

    def __init__(self, engine: LLMEngine, settings: SamplingSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def analyze(
        self, question: str, cards: Sequence[Mapping[str, Any]], *, seed: int | None = None, history: str = ""
    ) -> Generation:
        settings = request_settings(
            self.settings, schema=None, structured=False, seed=call_seed(seed, Module.ANALYSIS, 0)
        )
        return await self.engine.chat(query_analysis_messages(question, cards, history=history), settings)
