"""Tools by name: the one place that turns ``--tools python,search`` or a FlowRun's tool list into
``Tool`` objects.

Names are checked before anything is built (``check_tool_names``), so a typo fails in
milliseconds with the list of valid names instead of after an engine has started.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from flowlane.api.errors import ConfigError

if TYPE_CHECKING:
    from flowlane.runtime.engines.base import LLMEngine
    from flowlane.runtime.sandbox.runner import CodeRunner
    from flowlane.runtime.tools.base import Tool


class ToolName(StrEnum):
    PYTHON = "python"
    SEARCH = "search"
    GENERATOR = "generator"
    WEB_SEARCH = "web_search"
    WIKIPEDIA_SEARCH = "wikipedia_search"


def available_tools() -> list[str]:
    return [name.value for name in ToolName]


def check_tool_names(names: list[str]) -> list[ToolName]:
    """The names as ``ToolName``s; a ConfigError naming the first unknown or repeated one."""
    checked: list[ToolName] = []
    for raw in names:
        try:
            name = ToolName(raw.strip())
        except ValueError:
            raise ConfigError(f"unknown tool '{raw}'; available: {', '.join(available_tools())}") from None
        if name in checked:
            raise ConfigError(f"tool '{name.value}' is listed twice; list each tool once")
        checked.append(name)
    return checked


def build_tools(
    names: list[str],
    *,
    engine: LLMEngine,
    code_runner: CodeRunner | None = None,
    corpus_path: Path | str | None = None,
) -> list[Tool]:
    """The tools for ``names``, in order.

    ``engine`` answers for the generator tool; ``code_runner`` runs the python tool's code (a
    local sandbox by default, a remote sandbox client in a FlowRun); ``corpus_path`` is the
    search corpus (the bundled one by default).
    """
    from flowlane.runtime.tools.generator_tool import GeneratorTool
    from flowlane.runtime.tools.networked import WebSearchTool, WikipediaSearchTool
    from flowlane.runtime.tools.python_tool import PythonTool
    from flowlane.runtime.tools.search_tool import SearchTool

    factories: dict[ToolName, Callable[[], Tool]] = {
        ToolName.PYTHON: lambda: PythonTool(code_runner),
        ToolName.SEARCH: lambda: SearchTool(corpus_path),
        ToolName.GENERATOR: lambda: GeneratorTool(engine),
        ToolName.WEB_SEARCH: WebSearchTool,
        ToolName.WIKIPEDIA_SEARCH: WikipediaSearchTool,
    }
    return [factories[name]() for name in check_tool_names(names)]
