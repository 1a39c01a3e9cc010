"""Tools the agent's executor can call, all behind the ``Tool`` interface."""

from flowlane.runtime.tools.base import Tool, ToolResult

__all__ = ["Tool", "ToolResult"]
