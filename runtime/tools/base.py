"""The one interface every tool implements.

A tool describes itself to the planner (name, description, metadata such as what it is good and
bad at) and to the executor (``command_instruction`` and ``input_schema``: what a concrete command
looks like). The executor's fixed LLM turns the planner's sub-goal into a command; ``execute`` runs
it and never raises for a failure of the command itself: failures come back as
``ToolResult(ok=False, ...)`` so the agent can record them in memory and go on.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass
class ToolResult:
    output: str
    ok: bool = True
    error: str = ""  # short reason when ok is False ("timeout", "memory limit", "not configured", ...)
    duration_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Tool(abc.ABC):
    name: str = "tool"
    description: str = ""
    #: Free-form facts for the planner prompt: best_for, limitations, examples. Read-only here:
    #: tools replace it, per class or per instance (a tool's ``k`` may appear in its text).
    metadata: Mapping[str, Any] = MappingProxyType({})
    #: What the executor must write as the command, shown in its prompt.
    command_instruction: str = "Write the tool input."
    #: JSON schema of the executor's structured output for this tool.
    input_schema: Mapping[str, Any] = MappingProxyType({
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    })
    #: False when the sub-goal itself is the command (no executor LLM call needed).
    needs_command: bool = True

    @abc.abstractmethod
    async def execute(self, command: str) -> ToolResult:
        """Run one command. Must not raise for failures of the command itself."""

    def card(self) -> dict[str, Any]:
        """The tool as the planner sees it."""
        return {"name": self.name, "description": self.description, **self.metadata}

    async def close(self) -> None:  # noqa: B027 - optional hook, most tools hold nothing
        """Release resources. Safe to call twice."""
