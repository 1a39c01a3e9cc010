"""The ``generator`` tool: a plain answer from the fixed LLM (the paper's Base_Generator).

Useful for sub-goals that need language rather than computation or facts: rephrasing, summarising
what memory holds, reasoning in a few sentences. The sub-goal itself is the prompt, so the
executor makes no extra LLM call to write a command (``needs_command = False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowlane.runtime.tools.base import Tool, ToolResult

if TYPE_CHECKING:  # the engine module imports torch; building tool lists must stay cheap
    from flowlane.runtime.engines.base import LLMEngine, SamplingSettings

_SYSTEM = "You are a careful assistant. Answer the request directly and concisely."


class GeneratorTool(Tool):
    name = "generator"
    description = "Answers a request in plain language with the base language model (no tools, no lookup)."
    command_instruction = "The sub-goal is sent to the model as written."
    needs_command = False

    def __init__(self, engine: LLMEngine, settings: SamplingSettings | None = None) -> None:
        self.engine = engine
        self.metadata = {
            "best_for": "short reasoning, rephrasing, summarising known facts, general knowledge",
            "limitations": "cannot compute reliably or look anything up; may be wrong about specific facts",
        }
        if settings is None:
            from flowlane.runtime.engines.base import SamplingSettings

            settings = SamplingSettings(max_tokens=256, temperature=0.0)
        self.settings = settings

    async def execute(self, command: str) -> ToolResult:
        request = command.strip()
        if not request:
            return ToolResult("empty request", ok=False, error="empty command")
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": request}]
        try:
            generation = await self.engine.chat(messages, self.settings)
        except Exception as exc:  # the engine failing is a tool failure the agent can record
            return ToolResult(f"the model failed: {type(exc).__name__}: {exc}", ok=False, error="engine")
        text = generation.text.strip()
        return ToolResult(text or "(the model returned nothing)", ok=bool(text),
                          error="" if text else "empty answer",
                          details={"finish_reason": generation.finish_reason})  # fmt: skip
