"""Tools the agent's executor can call, all behind the ``Tool`` interface.

Offline by default (``python`` in the sandbox, ``search`` over the local corpus, ``generator``);
``web_search`` and ``wikipedia_search`` are optional plug-ins configured by environment variables.
Build them by name with ``build_tools``.
"""

from flowlane.runtime.tools.base import Tool, ToolResult
from flowlane.runtime.tools.generator_tool import GeneratorTool
from flowlane.runtime.tools.networked import WebSearchTool, WikipediaSearchTool
from flowlane.runtime.tools.python_tool import PythonTool
from flowlane.runtime.tools.registry import ToolName, available_tools, build_tools, check_tool_names
from flowlane.runtime.tools.search_tool import SearchTool

__all__ = [
    "GeneratorTool",
    "PythonTool",
    "SearchTool",
    "Tool",
    "ToolName",
    "ToolResult",
    "WebSearchTool",
    "WikipediaSearchTool",
    "available_tools",
    "build_tools",
    "check_tool_names",
]
