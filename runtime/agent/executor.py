"""The Tool Executor: turns the planner's sub-goal into a concrete command and runs it.

The fixed LLM writes the command (schema-constrained to the tool's ``input_schema`` when the
engine supports it); tools whose command *is* the sub-goal (``needs_command = False``) skip that
call. Running the command is bounded by a timeout, and nothing a tool does escapes as an
exception: a timeout, a crash or a misbehaving tool becomes ``ToolResult(ok=False)`` that the
agent records in memory and the planner can react to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowlane.runtime.agent.parsing import Parsed, parse_command
from flowlane.runtime.agent.prompts import (
    Module,
    call_seed,
    command_fields,
    executor_messages,
    request_settings,
)
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.tools.base import Tool, ToolResult

log = logging.getLogger(__name__)


@dataclass
class CommandOutput:
    command: str
    parsed: Parsed[str] | None  # None when no LLM call was needed
    generation: Generation | None


def _command_schema(input_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The tool's input schema, closed to extra keys so constrained decoding stays short."""
    schema = dict(input_schema)
    schema.setdefault("additionalProperties", False)
    return schema


class Executor:
    def __init__(self, engine: LLMEngine, settings: SamplingSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def command_for(
        self, tool: Tool, question: str, *, sub_goal: str, context: str, turn: int, seed: int | None = None,
        history: str = "",
    ) -> CommandOutput:
        if not tool.needs_command:
            return CommandOutput(sub_goal, None, None)
        messages = executor_messages(
            question, tool.card(), tool.command_instruction, tool.input_schema,
            sub_goal=sub_goal, context=context, history=history,
        )
        settings = request_settings(
            self.settings,
            schema=_command_schema(tool.input_schema),
            structured=self.engine.supports_structured_output,
            seed=call_seed(seed, Module.EXECUTOR, turn),
        )
        generation = await self.engine.chat(messages, settings)
        parsed = parse_command(generation.text, command_fields(tool.input_schema))
        # An empty command helps nobody; the sub-goal is the best stand-in we have.
        command = parsed.value or sub_goal
        return CommandOutput(command, parsed, generation)

    @staticmethod
    async def execute(tool: Tool, command: str, *, timeout_s: float) -> ToolResult:
        """Run ``command`` on ``tool``; never raises (except on cancellation of the caller)."""
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(tool.execute(command), timeout=max(timeout_s, 0.001))
        except TimeoutError:
            result = ToolResult(f"tool {tool.name!r} timed out after {timeout_s:.1f}s", ok=False, error="timeout")
        except Exception as err:  # a tool broke its contract; keep the trajectory going
            log.warning("tool %s raised %s: %s", tool.name, type(err).__name__, err)
            result = ToolResult(f"tool {tool.name!r} failed: {type(err).__name__}: {err}", ok=False,
                                error=type(err).__name__)
        if not result.duration_s:
            result.duration_s = time.monotonic() - started
        return result
