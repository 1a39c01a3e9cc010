"""The operator at scale: reconcile latency and what each FlowRun costs the API server.

The real operator (kopf + flowlane's handlers) runs against the KMock API emulator over HTTP, the
emulator of tests/test_operator.py, in a process of its own as an API server would be. The
emulator counts every request by client (User-Agent), verb and resource; only the operator's
(``flowlane-operator`` and ``kopf``) are counted here, not the benchmark's own. Per mode:

- **latency, 1 FlowRun**: one at a time, ``--single`` times in a row: the time the emulator stored
  the FlowRun to the time it stored the last of its 9 children (3 pods, 2 headless Services, the
  run ConfigMap, the sandbox NetworkPolicy, the PodDisruptionBudget, the token Secret), measured on the server side;
- **latency, N at once** (``--burst``): N FlowRuns created by 16 clients concurrently;
- **requests per FlowRun, creation to Running**: from the first create until every run of the
  burst is Running (the benchmark plays the kubelet: it sets each pod Running once all exist);
- **steady state**: requests per second per Running run over ``--window-s`` seconds at the
  default 10 s reconcile interval, with a learner whose step advances on every status call (so
  every interval has a new status to write), then the same per finished (Succeeded) run; watch
  requests are left out of both and listed apart: kopf keeps one watch per resource kind for the
  whole operator and opens an idle one again after 70 s without events, whatever the number of runs;
- **CPU ms per FlowRun**: CPU time of the operator's process from the first create until every
  child of the burst exists, per run: what the burst costs, whatever else loads the machine; the
  same for the emulator's process (what the requests cost an API server written in Python);
- **operator RSS**: resident memory of the operator's process at the end (it holds the indexes).

Each mode runs in a fresh process with a fresh emulator. ``current`` is the operator as it is;
``baseline`` is the same operator with the issue-14 savings switched off (no kopf indexes: a GET
of the resource and a LIST per child kind on every reconcile; no server-side label selectors;
Secrets read on every reconcile; timers on finished runs): the operator before those changes.

    .venv/bin/python bench/reconcile_latency.py [--single 10] [--burst 100] [--window-s 30]
        [--modes baseline,current]

The emulator is in-process Python, so latencies are an upper bound on the operator's own
overhead, not a prediction for a real API server; request counts carry over as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_kube import (
    FLOWRUNS,
    PODS,
    ApiServerEmulator,
    KMockServer,
    KubeApi,
    OperatorThread,
    wait_until,
)

import flowlane.operator.handlers as handlers
import flowlane.operator.kube_reconciler as kube_reconciler
from flowlane.operator.reconcile import Progress, RunRef
from flowlane.operator.settings import OperatorConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

CHILDREN = [("pods", "learner"), ("pods", "rollout-0"), ("pods", "sandbox-0"), ("services", "learner"),
            ("services", "sandbox-0"), ("configmaps", "config"), ("networkpolicies", "sandbox-policy"),
            ("poddisruptionbudgets", "pdb"), ("secrets", "grpc-token")]
OPERATOR_CLIENTS = ("flowlane-operator", "kopf")
CREATED_PATH = "/bench/created"
REQUESTS_PATH = "/bench/requests"


def flowrun(name: str) -> dict[str, Any]:
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": name},
            "spec": {"storage": {"checkpointUri": f"s3://bench/{name}"}}}


# -- the emulator in a process of its own ------------------------------------------------------------


def serve_kmock() -> None:
    """Child-process mode: run the emulator, print its URL, serve creation times and request counts."""
    server = KMockServer().start()
    assert server.emulator is not None
    emulator = server.emulator

    def created(request: Any) -> dict[str, float]:
        namespace = request.params.get("namespace")
        return {f"{plural}/{name}": t for (plural, ns, name), t in ApiServerEmulator.created_at.items()
                if ns == namespace}

    def requests(_: Any) -> list[list[Any]]:
        return [[*key, count] for key, count in emulator.request_counts.items()]

    server.call(lambda: emulator[f"get {CREATED_PATH}"] << created)
    server.call(lambda: emulator[f"get {REQUESTS_PATH}"] << requests)
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

    def _get(self, path: str, **params: str) -> Any:
        import httpx

        response = httpx.get(self.url + path, params=params, timeout=60)
        response.raise_for_status()
        return response.json()

    def created(self, namespace: str) -> dict[str, float]:
        data: dict[str, float] = self._get(CREATED_PATH, namespace=namespace)
        return data

    def operator_requests(self) -> int:
        """Requests the operator (its own client and kopf's) has made so far."""
        return sum(count for client, _, _, count in self._get(REQUESTS_PATH) if client in OPERATOR_CLIENTS)

    def requests_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for client, verb, kind, count in self._get(REQUESTS_PATH):
            if client in OPERATOR_CLIENTS:
                out[f"{verb} {kind}"] = out.get(f"{verb} {kind}", 0) + count
        return out

    def cpu_s(self) -> float:
        """CPU seconds the emulator's process has used (``/proc/<pid>/stat``: utime + stime)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(60)


# -- a learner that makes progress ---------------------------------------------------------------------


@dataclass
class TrainingProgress:
    """A ``ProgressSource`` whose step advances on every call: each interval has a new status to write."""

    finished: bool = False
    steps: dict[str, int] = field(default_factory=dict)

    async def __call__(self, run: RunRef) -> Progress | None:
        step = self.steps[run.name] = self.steps.get(run.name, 0) + 1
        return Progress(step=step, total_steps=1_000_000, policy_version=step, reward=0.5, finished=self.finished)

    async def checkpoint(self, run: RunRef, timeout_s: float) -> Progress | None:
        return None


@contextlib.contextmanager
def baseline_operator() -> Iterator[None]:
    """The operator with the issue-14 savings switched off (what it did before them)."""
    with mock.patch.object(kube_reconciler.Reconciler, "use_indexes", lambda self, indexes: None), \
            mock.patch.object(handlers, "watch_only_flowlane_children", lambda settings: None), \
            mock.patch.object(handlers, "timer_active", lambda **kw: True), \
            mock.patch.object(kube_reconciler, "_all_pods_present", lambda flowrun, pods: False):
        yield


# -- one mode ------------------------------------------------------------------------------------------


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


def all_latencies(server: RemoteKMock, namespace: str, names: list[str]) -> dict[str, float] | None:
    found = latencies(server, namespace, names)
    return found if len(found) == len(names) else None


def phases(api: KubeApi) -> dict[str, str]:
    return {o["metadata"]["name"]: (o.get("status") or {}).get("phase", "") for o in api.objects(FLOWRUNS)}


def all_in_phase(api: KubeApi, names: list[str], phase: str) -> bool:
    found = phases(api)
    return all(found.get(n) == phase for n in names)


def cpu_s() -> float:
    """CPU seconds of this process (the operator; the benchmark's client is a small share of it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_operator(server: RemoteKMock, namespace: str, progress: Any, interval_s: float) -> OperatorThread:
    config = OperatorConfig(namespaces=[namespace], server=server.url, insecure=True, health_port=None,
                            metrics_port=None, scanning=False, log_level="error", reconcile_interval_s=interval_s)
    return OperatorThread(config, progress).start()


def run_single(server: RemoteKMock, count: int) -> list[float]:
    api = KubeApi(server.url, "bench-single")
    operator = start_operator(server, api.namespace, TrainingProgress(), 300.0)  # timers stay out of it
    try:
        out = []
        for i in range(count):
            name = f"single-{i}"
            api.create(FLOWRUNS, flowrun(name))
            out.append(wait_until(lambda name=name: latencies(server, api.namespace, [name]).get(name),
                                  timeout=60, interval=0.02))
        return out
    finally:
        operator.stop()


def requests_in(server: RemoteKMock, window_s: float) -> dict[str, int]:
    """The operator's requests by verb and resource during the next ``window_s`` seconds."""
    before = server.requests_by_kind()
    time.sleep(window_s)
    return {k: n - before.get(k, 0) for k, n in server.requests_by_kind().items() if n > before.get(k, 0)}


def per_run(kinds: dict[str, int]) -> int:
    """Requests that runs cost: all but watches, which are one per resource kind for the whole operator
    whatever the number of runs (kopf opens an idle one again after 70 s without events)."""
    return sum(n for kind, n in kinds.items() if not kind.startswith("watch "))


def run_burst(server: RemoteKMock, count: int, window_s: float) -> dict[str, Any]:
    # One client for every thread (httpx's is thread-safe): building one (its SSL context) costs more
    # than a request, and in this process it would take the GIL from the operator being measured.
    api = KubeApi(server.url, "bench-burst")
    progress = TrainingProgress()
    operator = start_operator(server, api.namespace, progress, 10.0)  # the default interval
    names = [f"burst-{i}" for i in range(count)]
    try:
        before, cpu_before, server_cpu_before = server.operator_requests(), cpu_s(), server.cpu_s()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:  # as fast as the API server takes them
            list(pool.map(lambda name: api.create(FLOWRUNS, flowrun(name)), names))
        # Polling reads every creation time from the emulator: rarely enough not to load it at 1,000.
        poll_s = 0.2 if count <= 200 else 1.0
        done = wait_until(partial(all_latencies, server, api.namespace, names), timeout=1200, interval=poll_s)
        all_done_s = time.monotonic() - started
        cpu_per_run_ms = (cpu_s() - cpu_before) / count * 1000
        server_cpu_per_run_ms = (server.cpu_s() - server_cpu_before) / count * 1000
        # Play the kubelet: every pod Running, then wait for every run to say so.
        pods = [p["metadata"]["name"] for p in api.objects(PODS)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda pod: api.set_pod_phase(pod, "Running"), pods))
        wait_until(lambda: all_in_phase(api, names, "Running"), timeout=1200, interval=poll_s * 2.5)
        to_running = (server.operator_requests() - before) / count

        time.sleep(2)
        running_kinds = requests_in(server, window_s)
        running_rate = per_run(running_kinds) / count / window_s

        progress.finished = True
        wait_until(lambda: all_in_phase(api, names, "Succeeded"), timeout=1200, interval=poll_s * 2.5)
        time.sleep(2)
        finished_kinds = requests_in(server, window_s)
        finished_rate = per_run(finished_kinds) / count / window_s
        return {"finished_kinds": finished_kinds, "running_kinds": running_kinds,
                "latencies": list(done.values()), "all_done_s": all_done_s, "cpu_ms": cpu_per_run_ms,
                "server_cpu_ms": server_cpu_per_run_ms,
                "to_running": to_running,
                "running_rate": running_rate, "finished_rate": finished_rate, "rss_mib": rss_mib()}
    finally:
        operator.stop()


def run_mode(mode: str, single: int, burst: int, window_s: float) -> dict[str, Any]:
    server = RemoteKMock()
    try:
        with baseline_operator() if mode == "baseline" else contextlib.nullcontext():
            result = run_burst(server, burst, window_s)
            result["single"] = run_single(server, single) if single else []
        result["requests_by_kind"] = server.requests_by_kind()
        return result
    finally:
        server.stop()


# -- the table -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--single", type=int, default=10, help="FlowRuns created one at a time")
    parser.add_argument("--burst", type=int, default=100, help="FlowRuns created at once")
    parser.add_argument("--window-s", type=float, default=30.0, help="steady-state measuring window")
    parser.add_argument("--modes", default="baseline,current", help="comma-separated: baseline, current")
    parser.add_argument("--serve-kmock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # child: run one mode, print JSON
    args = parser.parse_args()
    if args.serve_kmock:
        serve_kmock()
        return
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.single, args.burst, args.window_s)))
        return
    results = {}
    for mode in args.modes.split(","):
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--single", str(args.single),
                                "--burst", str(args.burst), "--window-s", str(args.window_s)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"{mode}: the benchmark process exited {child.returncode}:\n{child.stderr[-4000:]}")
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]
    common.print_header("flowlane operator at scale")
    print(f"\nOperator at scale, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; KMock in its own process over HTTP; {args.burst} FlowRuns at once\n")
    head = ["mode", "1 run p50 ms", f"{args.burst} runs p50 s", "p99 s", "all done s", "operator CPU ms/run",
            "API server CPU ms/run",
            "req/run to Running",
            "req/s per Running run", "req/s per finished run", "operator RSS MiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for mode, r in results.items():
        single = f"{statistics.median(r['single']) * 1000:.0f}" if r["single"] else "-"
        print(f"| {mode} | {single} | {statistics.median(r['latencies']):.2f} | {percentile(r['latencies'], 0.99):.2f} "
              f"| {r['all_done_s']:.1f} | {r['cpu_ms']:.0f} | {r['server_cpu_ms']:.0f} | {r['to_running']:.1f} "
              f"| {r['running_rate']:.3f} | {r['finished_rate']:.3f} "
              f"| {r['rss_mib']:.0f} |")
    for mode, r in results.items():
        top = sorted(r["requests_by_kind"].items(), key=lambda kv: -kv[1])[:8]
        print(f"\n{mode}: operator requests in all: " + ", ".join(f"{k} {v}" for k, v in top))
        for state in ("running", "finished"):
            seen = ", ".join(f"{k} {v}" for k, v in sorted(r[f"{state}_kinds"].items())) or "none"
            print(f"{mode}: operator requests in the {args.window_s:.0f} s window with every run {state} "
                  f"(watches are the operator's, one per kind, not the runs'): {seen}")


if __name__ == "__main__":
    main()
