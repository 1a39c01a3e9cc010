"""Reconcile latency of the operator: from a FlowRun's creation to all of its children existing.

The real operator (kopf + flowlane's handlers) runs against the KMock API emulator over HTTP, the
emulator of tests/test_operator.py, here in a process of its own as an API server would be.
Latency is measured on the API-server side: the time the emulator stored the FlowRun to the time
it stored the FlowRun's last child (3 pods, 2 headless Services, the run ConfigMap, the sandbox
NetworkPolicy and the token Secret), so client polling adds nothing. Two scenarios:

- **1 FlowRun**: one at a time, ``--single`` times in a row (the latency of a quiet operator);
- **100 FlowRuns at once**: created concurrently by 16 clients; the operator works through the burst.

    .venv/bin/python bench/operator.py [--single 20] [--burst 100]

Prints a table of p50 / p99 / max in milliseconds. The emulator is in-process Python, so the
numbers are an upper bound on the operator's own overhead, not a prediction for a real API server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_kube import (
    FLOWRUNS,
    ApiServerEmulator,
    FakeProgress,
    KMockServer,
    KubeApi,
    OperatorThread,
    wait_until,
)

from flowlane.operator.settings import OperatorConfig

CHILDREN = [("pods", "learner"), ("pods", "rollout-0"), ("pods", "sandbox-0"), ("services", "learner"),
            ("services", "sandbox-0"), ("configmaps", "config"), ("networkpolicies", "sandbox-policy"),
            ("secrets", "grpc-token")]


def flowrun(name: str) -> dict[str, Any]:
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": name},
            "spec": {"storage": {"checkpointUri": f"s3://bench/{name}"}}}


CREATED_PATH = "/bench/created"


def serve_kmock() -> None:
    """Child-process mode: run the emulator, print its URL, serve creation times until stdin closes."""
    server = KMockServer().start()

    def created(request: Any) -> dict[str, float]:
        namespace = request.params.get("namespace")
        return {f"{plural}/{name}": t for (plural, ns, name), t in ApiServerEmulator.created_at.items()
                if ns == namespace}

    assert server.emulator is not None
    emulator = server.emulator
    server.call(lambda: emulator[f"get {CREATED_PATH}"] << created)
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


class RemoteKMock:
    """The emulator in a child process (its own interpreter and CPU, like a real API server)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-kmock"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the KMock process did not start")

    def created(self, namespace: str) -> dict[str, float]:
        import httpx

        response = httpx.get(self.url + CREATED_PATH, params={"namespace": namespace}, timeout=30)
        response.raise_for_status()
        data: dict[str, float] = response.json()
        return data

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def latencies(server: RemoteKMock, namespace: str, names: list[str]) -> dict[str, float]:
    """Seconds from each FlowRun's creation to its last child's, for those with every child."""
    created = server.created(namespace)
    out = {}
    for name in names:
        start = created.get(f"flowruns/{name}")
        children = [created.get(f"{plural}/{name}-{suffix}") for plural, suffix in CHILDREN]
        if start is not None and all(c is not None for c in children):
            out[name] = max(c for c in children if c is not None) - start
    return out


def single_latency(server: RemoteKMock, namespace: str, name: str) -> float | None:
    return latencies(server, namespace, [name]).get(name)


def all_latencies(server: RemoteKMock, namespace: str, names: list[str]) -> dict[str, float] | None:
    found = latencies(server, namespace, names)
    return found if len(found) == len(names) else None


def start_operator(server: RemoteKMock, namespace: str) -> OperatorThread:
    config = OperatorConfig(namespaces=[namespace], server=server.url, insecure=True, health_port=None,
                            metrics_port=None, scanning=False, log_level="error",
                            reconcile_interval_s=300.0)  # timers stay out of the measurement
    return OperatorThread(config, FakeProgress()).start()


def run_single(server: RemoteKMock, count: int) -> list[float]:
    api = KubeApi(server.url, "bench-single")
    operator = start_operator(server, api.namespace)
    try:
        out = []
        for i in range(count):
            name = f"single-{i}"
            api.create(FLOWRUNS, flowrun(name))
            out.append(wait_until(partial(single_latency, server, api.namespace, name), timeout=60, interval=0.02))
        return out
    finally:
        operator.stop()


def run_burst(server: RemoteKMock, count: int) -> tuple[list[float], float]:
    api = KubeApi(server.url, "bench-burst")
    operator = start_operator(server, api.namespace)
    try:
        started = time.monotonic()
        names = [f"burst-{i}" for i in range(count)]
        with ThreadPoolExecutor(max_workers=16) as pool:  # as fast as the API server takes them
            list(pool.map(lambda name: KubeApi(server.url, api.namespace).create(FLOWRUNS, flowrun(name)), names))
        done = wait_until(partial(all_latencies, server, api.namespace, names), timeout=600, interval=0.2)
        total = time.monotonic() - started
        return list(done.values()), total
    finally:
        operator.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--single", type=int, default=20, help="FlowRuns created one at a time")
    parser.add_argument("--burst", type=int, default=100, help="FlowRuns created at once")
    parser.add_argument("--serve-kmock", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_kmock:
        serve_kmock()
        return
    server = RemoteKMock()
    try:
        single = run_single(server, args.single)
        burst, burst_total = run_burst(server, args.burst)
    finally:
        server.stop()
    rows = [(f"1 FlowRun (x{args.single}, one at a time)", single, None),
            (f"{args.burst} FlowRuns at once", burst, burst_total)]
    load = os.getloadavg()[0]
    print(f"\nOperator reconcile latency, create -> all 8 children present (KMock in its own process, "
          f"over HTTP; {os.cpu_count()} CPUs, load average {load:.1f})\n")
    print(f"| {'scenario':<34} | {'p50 ms':>8} | {'p99 ms':>8} | {'max ms':>8} | {'all done s':>10} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for label, values, total in rows:
        ms = [v * 1000 for v in values]
        done = f"{total:.2f}" if total is not None else "-"
        print(f"| {label:<34} | {statistics.median(ms):8.1f} | {percentile(ms, 0.99):8.1f} | {max(ms):8.1f} "
              f"| {done:>10} |")


if __name__ == "__main__":
    main()
