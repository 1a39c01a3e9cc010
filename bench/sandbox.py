"""What the sandbox's layers cost per execution, against a bare ``python -c`` subprocess.

For each layer set: the latency of one execution of a trivial program (p50/p95, ms) and the
executions per second at 1, 4 and 16 concurrent runs. The baseline, measured in the same run, is
the same interpreter started as a plain subprocess with ``-I -c pass``. Target: under 50 ms added
per execution with every layer on. Latency rounds interleave the rows (one execution of each per
round), so that load from other work on a shared machine falls on the baseline and the sandbox
alike.

    .venv/bin/python bench/sandbox.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from flowlane.runtime.sandbox.layers import Isolation
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.runner import run_python

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

LIMITS = SandboxLimits(wall_time_s=30)
LAYER_SETS = {
    "all layers": Isolation(),
    "no seccomp/landlock": Isolation(seccomp=False, landlock=False),
    "rlimits + tracking only": Isolation(network_namespace=False, private_tmp=False, audit_hook=False,
                                         seccomp=False, landlock=False),
}


async def bare() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-c", "pass")
    if await proc.wait() != 0:
        raise RuntimeError("bare python failed")


async def bare_without_site() -> None:
    """The interpreter start the sandbox child itself pays (it runs with -S): for reference."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-S", "-c", "pass")
    if await proc.wait() != 0:
        raise RuntimeError("bare python -S failed")


def sandboxed(isolation: Isolation) -> Callable[[], Awaitable[None]]:
    async def one() -> None:
        result = await run_python("pass", LIMITS, isolation=isolation)
        if not result.ok:
            raise RuntimeError(f"sandbox run failed: {result.message}")
    return one


async def interleaved_latencies_ms(rows: list[Callable[[], Awaitable[None]]], runs: int) -> list[list[float]]:
    """Per row, ``runs`` latencies of one execution; each round runs every row once."""
    for execute in rows:
        await execute()  # warm the page cache (and, in the sandbox, build the seccomp program)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(runs):
        for i, execute in enumerate(rows):
            start = time.perf_counter()
            await execute()
            times[i].append((time.perf_counter() - start) * 1000)
    return times


async def throughput(execute: Callable[[], Awaitable[None]], concurrency: int, total: int) -> float:
    slots = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with slots:
            await execute()

    start = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(total)))
    return total / (time.perf_counter() - start)


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


async def main(runs: int) -> None:
    rows: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("bare python -I -c pass", bare), ("bare python -I -S -c pass", bare_without_site)]
    rows += [(name, sandboxed(iso)) for name, iso in LAYER_SETS.items()]
    base_p50 = 0.0
    common.print_header("flowlane sandbox start-up benchmark", [f"{runs} runs per row, interleaved"])
    print(f"| {'what':<26} | p50 ms | p95 ms | added p50 ms | exec/s @1 | @4 | @16 |")
    print(f"|{'-' * 28}|--------|--------|--------------|-----------|-----|-----|")
    latencies = await interleaved_latencies_ms([execute for _, execute in rows], runs)
    for (name, execute), times in zip(rows, latencies, strict=True):
        p50 = statistics.median(times)
        if execute is bare:
            base_p50 = p50
        rates = [await throughput(execute, c, max(16, c * 2)) for c in (1, 4, 16)]
        added = "-" if execute in (bare, bare_without_site) else f"{p50 - base_p50:+.1f}"
        print(f"| {name:<26} | {p50:6.1f} | {p95(times):6.1f} | {added:>12} | {rates[0]:9.1f} | {rates[1]:3.0f} | "
              f"{rates[2]:3.0f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="sequential executions per latency row")
    asyncio.run(main(parser.parse_args().runs))
