"""The Execution Verifier: after each step, decide STOP (enough to answer) or CONTINUE.

Runs on the fixed LLM with a two-value schema (reason, then STOP/CONTINUE) where the engine
supports it. When its output cannot be read the safe default is CONTINUE: stopping early on a
misread costs an answer, continuing costs one more turn, and the turn budget bounds that.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowlane.api.trajectory import Verdict
from flowlane.runtime.agent.parsing import Parsed, VerifierDecision, parse_verdict
from flowlane.runtime.agent.prompts import (
    VERIFIER_SCHEMA,
    Module,
    call_seed,
    request_settings,
    verifier_messages,
)
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings


@dataclass
class VerifierOutput:
    parsed: Parsed[VerifierDecision]
    generation: Generation

    @property
    def verdict(self) -> Verdict:
        return self.parsed.value.verdict


class Verifier:
    def __init__(self, engine: LLMEngine, settings: SamplingSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def verify(
        self, question: str, analysis: str, memory_text: str, *, turn: int, seed: int | None = None,
        history: str = "",
    ) -> VerifierOutput:
        settings = request_settings(
            self.settings,
            schema=VERIFIER_SCHEMA,
            structured=self.engine.supports_structured_output,
            seed=call_seed(seed, Module.VERIFIER, turn),
        )
        generation = await self.engine.chat(verifier_messages(question, analysis, memory_text, history=history),
                                            settings)
        return VerifierOutput(parse_verdict(generation.text, default=Verdict.CONTINUE), generation)
