"""Learning signal: does the untrained planner ever succeed on a task set, as Flow-GRPO samples it?

Flow-GRPO learns only from groups whose G rewards differ: a question whose G trajectories all
fail (or all succeed) has zero advantage and, with ``skipUniformGroups``, is not trained on. So
before a learning run is worth its 30 minutes, the untrained planner must succeed now and then at
the training temperature. For each bundled task set this script runs the training questions'
groups exactly as a rollout worker samples them (the planner at temperature 0.7, the executor,
verifier and generator frozen on a second engine, the task set's tools) and reports:

- the share of trajectories that are correct, and of groups with a non-zero advantage (some but
  not all G correct): the ones a step learns from;
- planner turns per trajectory and the most common tool sequences: whether the agent uses the
  tools the task needs, and whether the verifier lets it take several turns.

``--min-turns`` sets ``algorithm.minTurns`` (the verifier is not asked before that turn) for the
multi-hop rows; arithmetic is the reference, the task set on which the default run learns.

Run ``.venv/bin/python bench/learning_signal.py [--questions 8] [--group 4] [--only multihop]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Setting:
    tasks: str
    tools: tuple[str, ...]
    max_turns: int
    min_turns: int = 1


SETTINGS = (
    Setting("arithmetic", ("python", "generator"), 3),  # the default run's (examples/flowrun.yaml)
    Setting("multihop", ("search", "generator"), 4),  # examples/flowrun-multihop.yaml without the floor
    Setting("multihop", ("search", "generator"), 4, min_turns=2),  # ... and with it
    Setting("multihop", ("search",), 4, min_turns=2),  # search only: every turn retrieves
    Setting("game24", ("python", "generator"), 3),
)


async def measure(settings: list[Setting], questions: int, group: int, temperature: float) -> list[dict[str, object]]:
    from flowlane.kit.tasks import load_tasks
    from flowlane.runtime.agent.agent import Agent, AgentConfig, AgentRequest
    from flowlane.runtime.engines.base import SamplingSettings
    from flowlane.runtime.engines.factory import close_engines, open_engines
    from flowlane.runtime.evaluate import score_trajectories
    from flowlane.runtime.tools.registry import build_tools

    engine, fixed = await open_engines("vllm", MODEL, MODEL, dtype="auto", seed=0)
    rows: list[dict[str, object]] = []
    try:
        for setting in settings:
            tasks = load_tasks(setting.tasks, "train")[:questions]
            config = AgentConfig.for_training(max_turns=setting.max_turns, min_turns=setting.min_turns,
                                              planner=SamplingSettings(max_tokens=256, temperature=temperature))
            agent = Agent(engine, fixed, build_tools(list(setting.tools), engine=fixed), config)
            requests = [AgentRequest(t.question, question_id=t.id, gold_answer=t.answer, seed=k * 1_000_003 + i)
                        for i, t in enumerate(tasks) for k in range(group)]
            started = time.monotonic()
            trajectories = await agent.run_many(requests, concurrency=64)
            seconds = time.monotonic() - started
            score_trajectories(trajectories, [t for t in tasks for _ in range(group)])
            correct = [(t.reward or 0.0) > 0.5 for t in trajectories]
            per_group = [sum(correct[i * group:(i + 1) * group]) for i in range(len(tasks))]
            sequences = Counter(" > ".join(s.tool_name for s in t.steps) for t in trajectories)
            rows.append({
                "task set": setting.tasks, "tools": ", ".join(setting.tools),
                "turns min / max": f"{setting.min_turns} / {setting.max_turns}",
                "trajectories": len(trajectories), "correct": f"{sum(correct)} ({sum(correct) / len(correct):.0%})",
                "groups with signal": f"{sum(0 < c < group for c in per_group)} of {len(tasks)}",
                "planner turns / traj.": sum(len(t.planner_turns) for t in trajectories) / len(trajectories),
                "top tool sequences": "; ".join(f"{seq} x{n}" for seq, n in sequences.most_common(3)),
                "s": seconds,
            })
    finally:
        await close_engines(engine, fixed)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8, help="Training questions per task set.")
    parser.add_argument("--group", type=int, default=4, help="G: trajectories per question.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Planner temperature (training's).")
    parser.add_argument("--only", default="", help="Comma-separated task sets (default: all).")
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    settings = [s for s in SETTINGS if not only or s.tasks in only]
    machine = common.machine_lines()
    rows = asyncio.run(measure(settings, args.questions, args.group, args.temperature))
    common.print_header(
        "Learning signal: the untrained planner at the training temperature, per bundled task set",
        [f"{MODEL} planner (temperature {args.temperature}) and frozen modules on two vLLM engines; the first "
         f"{args.questions} training questions of each set, G {args.group} trajectories each, seeded",
         "a group has signal when some but not all of its G trajectories are correct (non-zero advantage)"],
        machine=machine,
    )
    print(common.markdown_table(rows, list(rows[0]) if rows else []))


if __name__ == "__main__":  # vLLM on CPU spawns its engine core: the guard is required
    main()
