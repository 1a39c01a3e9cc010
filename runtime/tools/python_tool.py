"""The ``python`` tool: the executor's LLM writes a program for the sub-goal; the sandbox runs it.

The command is Python source. Small models often wrap it in a Markdown fence or end it with a
bare expression instead of ``print``; both are handled (the fence is stripped; a final bare
expression is printed, as in a REPL), because a correct computation whose result is never shown
is a wasted turn. The result the planner sees is what the program printed, or the error kind and
the tail of the traceback, short enough for a prompt.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxResult
from flowlane.runtime.sandbox.runner import CodeRunner, LocalCodeRunner
from flowlane.runtime.tools.base import Tool, ToolResult

#: Characters of program output the planner sees (the sandbox already capped what it kept).
MAX_RESULT_CHARS = 2000
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(command: str) -> str:
    """The program in ``command``: the first fenced block if there is one, else the text itself."""
    match = _FENCE.search(command)
    return (match.group(1) if match else command).strip("\n")


def print_last_expression(code: str) -> str:
    """``code`` with a final bare expression wrapped in ``print`` (unless it already prints).

    Code that does not parse is returned unchanged: the sandbox reports the syntax error.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1].value
    if isinstance(last, ast.Call) and isinstance(last.func, ast.Name) and last.func.id == "print":
        return code
    if isinstance(last, ast.Constant) and isinstance(last.value, str):
        return code  # a trailing docstring-like literal
    node = tree.body[-1]
    if len(tree.body) > 1 and (tree.body[-2].end_lineno or 0) >= node.lineno:
        return code  # shares its line with another statement ("x = 1; x"): leave it alone
    segment = ast.get_source_segment(code, last)
    if segment is None or node.end_lineno is None or node.end_col_offset is None:
        return code
    lines = code.splitlines()
    rest_of_line = lines[node.end_lineno - 1][node.end_col_offset :]  # a comment, a semicolon
    return "\n".join([*lines[: node.lineno - 1], f"print({segment}){rest_of_line}", *lines[node.end_lineno :]])


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n...(truncated)"


def format_result(result: SandboxResult) -> ToolResult:
    """The sandbox result as the planner should read it."""
    details: dict[str, Any] = {
        "exit_code": result.exit_code,
        "error_kind": result.error_kind.value if result.error_kind else None,
        "truncated": result.truncated,
        "isolation": [layer.value for layer in result.isolation],
    }
    if result.ok:
        output = result.stdout.strip() or "(the program printed nothing; print the result)"
        if result.truncated:
            output += "\n...(output truncated)"
        return ToolResult(_head(output, MAX_RESULT_CHARS), ok=True, duration_s=result.duration_s, details=details)
    parts = [result.message]
    if result.stdout.strip():
        parts.append("stdout:\n" + _head(result.stdout.strip(), MAX_RESULT_CHARS // 2))
    if result.stderr.strip():
        parts.append("stderr:\n" + _tail(result.stderr.strip(), MAX_RESULT_CHARS // 2))
    kind = result.error_kind.value if result.error_kind else "error"
    return ToolResult("\n".join(parts), ok=False, error=kind, duration_s=result.duration_s, details=details)


class PythonTool(Tool):
    name = "python"
    description = (
        "Runs a short Python 3 program and returns what it prints. Use it for exact arithmetic, "
        "counting, algebra (sympy), searching over combinations and checking a candidate answer."
    )
    command_instruction = (
        "Write a complete Python 3 program that computes the answer and prints it with print(). "
        "Standard library, numpy and sympy are available; no input(), no network, no files outside "
        "the working directory."
    )
    def __init__(self, runner: CodeRunner | None = None, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.runner = runner or LocalCodeRunner(self.limits)
        self.input_schema = {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "Python source code"}},
            "required": ["command"],
        }
        self.metadata = {
            "best_for": "exact calculations, brute-force search, verifying a candidate answer",
            "output": "only what the program prints (a final bare expression is printed for you)",
            "limitations": (
                "no network and no outside files; "
                f"{math.ceil(self.limits.cpu_time_s)} s CPU, {self.limits.wall_time_s:g} s wall clock, "
                f"{self.limits.memory_bytes // (1024 * 1024)} MiB memory, "
                f"{self.limits.max_output_bytes // 1024} KiB output"
            ),
        }

    async def execute(self, command: str) -> ToolResult:
        code = extract_code(command)
        if not code.strip():
            return ToolResult("no code to run: write a Python program that prints the answer", ok=False,
                              error="empty command")  # fmt: skip
        try:
            result = await self.runner.run(print_last_expression(code), self.limits)
        except Exception as exc:  # a broken runner (server gone) is a tool failure, not a crash
            return ToolResult(f"the code runner failed: {type(exc).__name__}: {exc}", ok=False, error="runner")
        return format_result(result)
