"""``flowlane solve``: answer one question with the agent and show each step as it happens.

A thin shell around ``Agent.run``: check the inputs (question, tool names, engine kind, model)
*before* starting an engine, so a typo costs a one-line error instead of a model load; start the
engine and tools; print every event (planner choice, tool command, tool result, verifier
verdict) and the answer with rich, or the whole trajectory as JSON with ``--json``.

Only typer and the standard library are imported at module level: ``flowlane --help`` and input
errors stay fast, and torch/vLLM load only when a question is really being answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from flowlane.api.trajectory import Step, Trajectory
    from flowlane.runtime.agent.agent import AgentConfig, AgentEventKind

DEFAULT_TOOLS = "python,search,generator"
RESULT_PREVIEW_CHARS = 600


def parse_tool_list(text: str) -> list[str]:
    """``"python, search"`` -> ``["python", "search"]``; order kept, duplicates dropped."""
    from flowlane.api.errors import ConfigError

    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ConfigError(f"no tools given in --tools {text!r}: name at least one, e.g. --tools {DEFAULT_TOOLS}")
    return names


def solve(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    tools: Annotated[str, typer.Option(help="Comma-separated tool names.")] = DEFAULT_TOOLS,
    engine: Annotated[str, typer.Option(help="LLM engine kind: vllm, transformers or openai.")] = "vllm",
    model: Annotated[str, typer.Option(help="Model directory or known model name.")] = "smollm2-135m-instruct",
    fixed: Annotated[str | None, typer.Option(
        help="A frozen model for the executor, verifier and generator, on a second engine (a FlowRun's "
             "spec.model.fixed); default: the planner's model and engine.")] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Base URL of an OpenAI-compatible server (engine openai).")
    ] = None,
    max_turns: Annotated[int, typer.Option(help="Turn budget (planner steps).")] = 10,
    max_time_s: Annotated[float, typer.Option(help="Wall-clock budget of the run, in seconds.")] = 300.0,
    temperature: Annotated[float, typer.Option(help="Planner sampling temperature.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the full trajectory as JSON.")] = False,
) -> None:
    """Answer one question with the agent, step by step."""
    from flowlane.api.errors import FlowlaneError

    try:
        _solve(question, tools=tools, engine_kind=engine, model=model, fixed=fixed, endpoint=endpoint,
               max_turns=max_turns, max_time_s=max_time_s, temperature=temperature, seed=seed,
               json_output=json_output)
    except FlowlaneError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _solve(
    question: str,
    *,
    tools: str,
    engine_kind: str,
    model: str,
    fixed: str | None,
    endpoint: str | None,
    max_turns: int,
    max_time_s: float,
    temperature: float,
    seed: int | None,
    json_output: bool,
) -> None:
    from flowlane.runtime.agent.agent import AgentConfig, check_question
    from flowlane.runtime.engines.base import SamplingSettings
    from flowlane.runtime.engines.factory import LOCAL_KINDS, parse_kind
    from flowlane.runtime.tools.registry import check_tool_names

    # Every cheap check first: a typo must not cost an engine start.
    question = check_question(question)
    tool_names = parse_tool_list(tools)
    check_tool_names(tool_names)
    kind = parse_kind(engine_kind)
    config = AgentConfig(max_turns=max_turns, max_time_s=max_time_s,
                         planner=SamplingSettings(max_tokens=256, temperature=temperature))
    model_ref, fixed_ref = model, fixed
    if kind in LOCAL_KINDS:
        from flowlane.kit.models import resolve_model

        model_ref = str(resolve_model(model))
        fixed_ref = str(resolve_model(fixed)) if fixed else None

    with _stdout_to_stderr() as out:
        trajectory = asyncio.run(
            _run(question, tool_names, kind.value, model_ref, fixed_ref, endpoint, config, seed,
                 None if json_output else out)
        )
        # Collect the closed engine now, while the interpreter is whole: vLLM's finalizer run at
        # interpreter exit prints an ignored-exception traceback.
        gc.collect()
        if json_output:
            out.write(json.dumps(trajectory.to_dict(), indent=2) + "\n")


async def _run(
    question: str,
    tool_names: list[str],
    kind: str,
    model: str,
    fixed: str | None,
    endpoint: str | None,
    config: AgentConfig,
    seed: int | None,
    show_on: TextIO | None,
) -> Trajectory:
    from flowlane.runtime.agent.agent import Agent
    from flowlane.runtime.engines.factory import close_engines, open_engines
    from flowlane.runtime.tools.registry import build_tools

    options: dict[str, Any] = {}
    if endpoint:
        options["base_url"] = endpoint
    engine, fixed_engine = await open_engines(kind, model, fixed, **options)
    tool_objects = []
    try:
        tool_objects = build_tools(tool_names, engine=fixed_engine)
        agent = Agent(engine, fixed_engine, tool_objects, config)
        printer = StepPrinter(_console(show_on)) if show_on is not None else None
        return await agent.run(question, seed=seed, on_event=printer)
    finally:
        for tool in tool_objects:
            await tool.close()
        await close_engines(engine, fixed_engine)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Send fd 1 to stderr while the engine runs; yield a stream on the real stdout.

    vLLM logs to stdout, also from its engine-core subprocess, which would corrupt ``--json``
    output and interleave with the step display; only what we print goes to the real stdout.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real fd 1 (embedded use): nothing to protect
        yield sys.stdout
        return
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield out
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        out.flush()
        out.close()


def _console(stream: TextIO) -> Console:
    from rich.console import Console

    return Console(file=stream, highlight=False, soft_wrap=True)


class StepPrinter:
    """An ``Agent.run`` event callback that prints each step as it happens."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __call__(self, kind: AgentEventKind, traj: Trajectory, step: Step | None) -> None:
        from rich.markup import escape

        from flowlane.runtime.agent.agent import AgentEventKind
        from flowlane.runtime.agent.memory import truncate

        c = self.console
        if kind is AgentEventKind.ANALYSIS:
            c.print(f"[bold]Question:[/bold] {escape(traj.question)}")
            c.print(f"[dim]Analysis: {escape(truncate(traj.query_analysis, 400))}[/dim]")
        elif kind is AgentEventKind.PLAN and step is not None:
            parsed = traj.planner_turns[-1].parsed if traj.planner_turns else True
            flag = "" if parsed else " [yellow](fallback parse)[/yellow]"
            c.print(f"\n[bold cyan]Turn {step.turn}[/bold cyan] planner -> [bold]{escape(step.tool_name)}[/bold]{flag}")
            c.print(f"  sub-goal: {escape(step.sub_goal)}")
        elif kind is AgentEventKind.COMMAND and step is not None:
            c.print(f"  command: [green]{escape(truncate(step.command, RESULT_PREVIEW_CHARS))}[/green]")
        elif kind is AgentEventKind.RESULT and step is not None:
            style = "" if step.tool_ok else "red"
            label = "result" if step.tool_ok else "result (tool failed)"
            text = escape(truncate(step.result, RESULT_PREVIEW_CHARS)) or "(empty)"
            c.print(f"  {label}: " + (f"[{style}]{text}[/{style}]" if style else text))
        elif kind is AgentEventKind.VERDICT and step is not None:
            colour = "magenta" if step.verdict.value == "STOP" else "blue"
            c.print(f"  verifier: [{colour}]{step.verdict.value}[/{colour}] {escape(step.verifier_reason)}")
        elif kind is AgentEventKind.ANSWER:
            c.print(f"\n[bold]Answer:[/bold] {escape(traj.answer)}")
            failures = ", ".join(f"{k} {v}" for k, v in traj.parse_failures.items()) or "none"
            c.print(
                f"[dim]stop: {traj.stop_reason.value} · turns: {len(traj.steps)} · "
                f"tokens: {traj.generated_tokens} · {traj.duration_s:.1f}s · parse fallbacks: {failures}[/dim]"
            )
