"""The Solution Generator: writes the final answer from the question and the memory.

Runs once per trajectory, after the loop ends for any reason (the verifier said STOP, a budget
ran out), so every trajectory has an answer to score. Free text: answers are judged by reward
functions that extract what they need, and a schema would only make a small model terser
without making it more correct.
"""

from __future__ import annotations

import dataclasses

from flowlane.runtime.agent.prompts import Module, call_seed, generator_messages, request_settings
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings


class SolutionGenerator:
    def __init__(self, engine: LLMEngine, settings: SamplingSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def answer(self, question: str, memory_text: str, *, seed: int | None = None, history: str = "",
                     instructions: str = "", stop: tuple[str, ...] = ()) -> Generation:
        """The answer; ``stop`` ends it at the first of these strings (a chat request's ``stop``)."""
        settings = request_settings(
            self.settings, schema=None, structured=False, seed=call_seed(seed, Module.GENERATOR, 0)
        )
        if stop:
            settings = dataclasses.replace(settings, stop=stop)
        messages = generator_messages(question, memory_text, history=history, instructions=instructions)
        return await self.engine.chat(messages, settings)
