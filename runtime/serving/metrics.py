"""Prometheus metrics of the serving gateway.

An operator of a FlowService needs to see, without reading logs: how many requests arrive and how
they end (by HTTP status), how long they take end to end (a whole agent run, not one generation),
how many turns the agent takes and which tools it calls, and which errors occur. Each gateway owns
its own ``CollectorRegistry`` so that several gateways in one process (tests, benchmarks) never
share or double-register series; ``/metrics`` renders that registry.

Token usage (the ``usage`` of a chat completion) is counted by ``MeteredEngine``, a pass-through
around the shared engine. Many requests use that one engine at once, so each request opens its
own ``Usage`` with ``metering(usage)``: a context variable, which asyncio copies into the tasks a
request starts, tells the engine which request a generation belongs to.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flowlane.api.trajectory import Trajectory
from flowlane.runtime.engines.base import Generation, SamplingSettings, WrappedEngine

PREFIX = "flowlane_gateway"
# Agent runs on a CPU take seconds to minutes; generations on a GPU take well under a second.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TURN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                 "Time from request to the last byte of the response (streams included).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.in_flight = Gauge(f"{PREFIX}_agent_runs_in_flight", "Agent runs being served now.", registry=r)
        self.turns = Histogram(f"{PREFIX}_agent_turns", "Planner turns per served agent run.",
                               buckets=TURN_BUCKETS, registry=r)
        self.stop_reasons = Counter(f"{PREFIX}_agent_stops", "Finished agent runs by stop reason.",
                                    ["reason"], registry=r)
        self.tool_calls = Counter(f"{PREFIX}_tool_calls", "Tool calls made by served agent runs.",
                                  ["tool"], registry=r)
        self.tool_errors = Counter(f"{PREFIX}_tool_errors", "Tool calls that failed.", ["tool"], registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens through the engine for served runs.", ["kind"],
                              registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Requests that ended in an error, by error code.",
                              ["code"], registry=r)

    def observe_request(self, endpoint: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(duration_s)

    def observe_run(self, traj: Trajectory, prompt_tokens: int, completion_tokens: int) -> None:
        self.turns.observe(len(traj.steps))
        self.stop_reasons.labels(reason=traj.stop_reason.value).inc()
        for tool, count in traj.tool_calls.items():
            self.tool_calls.labels(tool=tool).inc(count)
        for tool, count in traj.tool_errors.items():
            self.tool_errors.labels(tool=tool).inc(count)
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)

    def observe_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Usage:
    """Tokens the engine read and wrote for one request (all agent modules and metered tools)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0


_current_usage: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("flowlane_usage", default=None)


@contextlib.contextmanager
def metering(usage: Usage) -> Iterator[Usage]:
    """Count the generations made in this context (and tasks started from it) into ``usage``."""
    token = _current_usage.set(usage)
    try:
        yield usage
    finally:
        _current_usage.reset(token)


class MeteredEngine(WrappedEngine):
    """An engine that adds each generation's token counts to the current request's ``Usage``."""

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        generation = await self.inner.chat(messages, settings)
        usage = _current_usage.get()
        if usage is not None:
            usage.prompt_tokens += len(generation.prompt_ids)
            usage.completion_tokens += len(generation.token_ids)
            usage.calls += 1
        return generation
