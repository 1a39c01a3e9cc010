"""``flowlane eval``: score a planner on a held-out task split.

The same agent a rollout worker runs, in its evaluation setting (greedy planner, the evaluation
turn budget), over every question of a split; the score is the fraction answered correctly under
each task's reward. Results go to the terminal and, unless ``--no-track``, to MLflow as a run of
their own, so a checkpoint's accuracy can be compared with the training runs in the MLflow UI.
A FlowRun evaluates through its rollout workers instead (see ``learner_service``).

It sits on the rollout side because it runs the agent (engines, tools, rewards); the task sets and
the MLflow tracker it shares with the learner live below both, in ``flowlane.kit``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer


@dataclass
class EvalResult:
    tasks: str
    split: str
    model: str
    questions: int
    correct: int
    duration_s: float
    per_source: dict[str, tuple[int, int]]  # source -> (correct, total)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.questions, 1)


def score_trajectories(trajectories: Sequence[Any], tasks: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """Set each trajectory's reward from its task; returns (correct, total) per task source."""
    from flowlane.runtime.rewards import score

    per_source: dict[str, tuple[int, int]] = {}
    for traj, task in zip(trajectories, tasks, strict=True):
        traj.reward = score(task.reward, traj.answer, task)
        good, total = per_source.get(task.source, (0, 0))
        per_source[task.source] = (good + int(traj.reward > 0.5), total + 1)
    return per_source


async def evaluate(model: str, tasks_spec: str, split: str, *, engine_kind: str = "vllm",
                   tools: Sequence[str] = ("python", "generator"), max_turns: int = 10, min_turns: int = 1,
                   limit: int | None = None, concurrency: int = 32, seed: int = 0,
                   fixed: str | None = None, dtype: str = "auto") -> tuple[EvalResult, list[Any]]:
    from flowlane.api.enums import RewardKind
    from flowlane.api.errors import ConfigError
    from flowlane.kit.tasks import load_tasks
    from flowlane.runtime.agent.agent import Agent, AgentConfig, AgentRequest
    from flowlane.runtime.engines.factory import close_engines, open_engines
    from flowlane.runtime.rewards import resolve_kind
    from flowlane.runtime.tools.registry import build_tools

    tasks = load_tasks(tasks_spec, split)
    if limit:
        tasks = tasks[:limit]
    judged = [t.id for t in tasks if resolve_kind(t.reward) is RewardKind.JUDGE]
    if judged:  # refused before the engines start, not after every question has run
        raise ConfigError(f"{tasks_spec} ({split}): {len(judged)} tasks (e.g. {judged[0]}) are scored with reward "
                          "judge, which needs an LLM judge model that flowlane eval does not run; give those rows "
                          "an offline reward (exact, numeric, choice or game24)")
    options: dict[str, Any] = {"dtype": dtype, "seed": seed}
    # a frozen model for the executor, verifier and generator (spec.model.fixed) when given
    engine, fixed_engine = await open_engines(engine_kind, model, fixed, **options)
    try:
        agent = Agent(engine, fixed_engine, build_tools(list(tools), engine=fixed_engine),
                      AgentConfig(max_turns=max_turns, min_turns=min_turns))
        started = time.monotonic()
        requests = [AgentRequest(t.question, question_id=t.id, gold_answer=t.answer, seed=seed) for t in tasks]
        trajectories = await agent.run_many(requests, concurrency=concurrency)
        duration = time.monotonic() - started
    finally:
        await close_engines(engine, fixed_engine)
    per_source = score_trajectories(trajectories, tasks)
    correct = sum(good for good, _ in per_source.values())
    return EvalResult(tasks_spec, split, model, len(tasks), correct, duration, per_source), trajectories


def eval_command(
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="A model directory, a known model name, a run's checkpoints/ "
                              "directory (its latest) or a checkpoint URI (s3://bucket/run/step-NNNNNNNN)."),
    tasks: str = typer.Option("arithmetic", "--tasks", help="A bundled task set, a file or an s3:// URI."),
    split: str = typer.Option("test", "--split", help="The held-out split to score."),
    engine: str = typer.Option("vllm", "--engine", help="vllm or transformers."),
    tools: str = typer.Option("python,generator", "--tools", help="Comma-separated tool names."),
    max_turns: int = typer.Option(10, "--max-turns", min=1, help="Planner turn budget (10 in the paper)."),
    min_turns: int = typer.Option(1, "--min-turns", min=1, help="Turns before the verifier is first asked to "
                                  "stop (a FlowRun's algorithm.minTurns)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score at most this many questions."),
    fixed: str | None = typer.Option(None, "--fixed", help="A frozen model for the executor, verifier and "
                                     "generator (a FlowRun's spec.model.fixed); default: the planner's model."),
    dtype: str = typer.Option("auto", "--dtype", help="Weight dtype: auto (bfloat16 on a GPU, float32 on "
                              "CPU), float32, bfloat16 or float16."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log the result to MLflow."),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", envvar="MLFLOW_TRACKING_URI",
                                          help="MLflow tracking URI (default: a local store in ./runs/eval)."),
    experiment: str = typer.Option("flowlane-eval", "--experiment", help="MLflow experiment name."),
) -> None:
    """Score a planner on a held-out task split and log the result to MLflow."""
    from rich.console import Console
    from rich.table import Table

    result, trajectories = asyncio.run(
        evaluate(model, tasks, split, engine_kind=engine, tools=[t for t in tools.split(",") if t],
                 max_turns=max_turns, min_turns=min_turns, limit=limit, fixed=fixed, dtype=dtype)
    )
    table = Table(title=f"{result.model} on {result.tasks}/{result.split}")
    for column in ("source", "correct", "total", "accuracy"):
        table.add_column(column)
    for source, (good, total) in sorted(result.per_source.items()):
        table.add_row(source, str(good), str(total), f"{good / max(total, 1):.3f}")
    table.add_row("all", str(result.correct), str(result.questions), f"{result.accuracy:.3f}")
    console = Console()
    console.print(table)
    turns = sum(len(t.planner_turns) for t in trajectories) / max(len(trajectories), 1)
    console.print(f"planner turns per trajectory: {turns:.2f}")
    if track:
        from flowlane.kit.tracking import Tracker

        tracker = Tracker(experiment, run_dir=Path("runs/eval"), tracking_uri=mlflow_uri)
        tracker.start_run(f"eval-{Path(model).name}-{tasks}",
                          params={"model": model, "tasks": tasks, "split": split, "max_turns": max_turns,
                                  "min_turns": min_turns,
                                  "engine": engine, "tools": tools, "fixed": fixed or model,
                                  "dtype": dtype})
        tracker.log_metrics(0, {"eval/accuracy": result.accuracy, "eval/time_s": result.duration_s,
                                "eval/turns_per_trajectory": turns,
                                **{f"eval/accuracy/{s}": g / max(n, 1) for s, (g, n) in result.per_source.items()}})
        tracker.log_trajectories(0, trajectories[:8])
        tracker.end()
