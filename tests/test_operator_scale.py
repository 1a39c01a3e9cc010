"""What the operator costs the API server: requests counted by the KMock emulator, per client, verb
and resource, while the real operator runs FlowRuns through their lives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from fixtures_kube import FLOWRUNS, PODS, KMockServer, KubeApi
from test_operator import MEMBERS, flowrun, run_group, wait_members, wait_phase

from flowlane.operator.handlers import watch_only_flowlane_children
from flowlane.operator.kube_client import USER_AGENT
from flowlane.operator.reconcile import Progress, RunRef

Counts = dict[tuple[str, str, str], int]


def counts(server: KMockServer) -> Counts:
    emulator = server.emulator
    assert emulator is not None
    return server.call(lambda: dict(emulator.request_counts))


def operator_requests(before: Counts, after: Counts) -> Counts:
    """Requests of the operator (its own client and kopf's) between two snapshots."""
    return {k: n - before.get(k, 0) for k, n in after.items()
            if n > before.get(k, 0) and k[0] in (USER_AGENT, "kopf")}


# What kopf lists once at start, then watches: the two kinds and the children of a run or service.
WATCHED = {"flowruns.flowlane.dev", "flowservices.flowlane.dev", "pods", "services", "configmaps",
           "deployments.apps", "networkpolicies.networking.k8s.io", "poddisruptionbudgets.policy"}


def wait_for_kopf_watches(server: KMockServer, before: Counts, timeout_s: float = 30) -> None:
    """Until kopf has listed every watched resource since ``before``: its start-up, not the run's."""
    deadline = time.monotonic() + timeout_s
    listed: set[str] = set()
    while time.monotonic() < deadline:
        listed = {k[2] for k in operator_requests(before, counts(server)) if k[:2] == ("kopf", "list")}
        if listed >= WATCHED:
            return
        time.sleep(0.05)
    raise AssertionError(f"kopf listed {sorted(listed)} of {sorted(WATCHED)} in {timeout_s} s")


@dataclass
class TrainingProgress:
    """A learner whose step advances on every status call: every interval has a new status to write."""

    finished: bool = False
    step: int = 0
    asked: list[str] = field(default_factory=list)

    async def __call__(self, run: RunRef) -> Progress | None:
        self.step += 1
        self.asked.append(run.name)
        return Progress(step=self.step, total_steps=10_000, policy_version=self.step, finished=self.finished)

    async def checkpoint(self, run: RunRef, timeout_s: float) -> Progress | None:
        return None


def test_the_emulator_counts_requests_by_client_verb_and_resource(kube: KubeApi, kmock_server: KMockServer) -> None:
    before = counts(kmock_server)
    kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
    kube.set_pod_phase("p", "Running")
    kube.get(PODS, "p")
    kube.objects(PODS)
    after = counts(kmock_server)
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {
        ("python-httpx", "create", "pods"): 1, ("python-httpx", "patch", "pods/status"): 1,
        ("python-httpx", "get", "pods"): 1, ("python-httpx", "list", "pods"): 1}


def test_child_watches_select_flowlane_objects_on_the_server() -> None:
    settings = kopf.OperatorSettings()
    watch_only_flowlane_children(settings)

    def selector(group: str, version: str, plural: str) -> list[str]:
        return list(settings.watching.label_selectors.collect(kopf.Resource(group, version, plural)))

    for group, version, plural in [("", "v1", "pods"), ("", "v1", "services"), ("", "v1", "configmaps"),
                                   ("apps", "v1", "deployments"), ("networking.k8s.io", "v1", "networkpolicies")]:
        assert selector(group, version, plural) == ["app.kubernetes.io/managed-by=flowlane-operator"], plural
    assert selector("flowlane.dev", "v1alpha1", "flowruns") == []  # users label their runs as they like


def test_a_run_reaches_running_without_listing_or_rereading_its_children(
        kube: KubeApi, kmock_server: KMockServer, start_operator: Any) -> None:
    started = counts(kmock_server)
    start_operator(TrainingProgress(), reconcile_interval_s=0.5)
    wait_for_kopf_watches(kmock_server, started)
    before = counts(kmock_server)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    spent = operator_requests(before, counts(kmock_server))
    assert {k: n for k, n in spent.items() if k[1] == "list"} == {}
    assert spent[(USER_AGENT, "create", "pods")] == 4
    assert spent.get((USER_AGENT, "get", "pods"), 0) == 0


def test_a_running_run_costs_one_status_patch_per_interval(
        kube: KubeApi, kmock_server: KMockServer, start_operator: Any) -> None:
    progress = TrainingProgress()
    start_operator(progress, reconcile_interval_s=0.5)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    time.sleep(1.0)
    before, asked = counts(kmock_server), len(progress.asked)
    time.sleep(2.5)
    spent = operator_requests(before, counts(kmock_server))
    ticks = len(progress.asked) - asked
    assert ticks >= 3  # the timer ran
    assert set(spent) == {(USER_AGENT, "patch", "flowruns.flowlane.dev/status")}
    assert ticks - 1 <= spent[(USER_AGENT, "patch", "flowruns.flowlane.dev/status")] <= ticks + 1


def test_a_finished_run_costs_no_requests_and_its_timer_stops(
        kube: KubeApi, kmock_server: KMockServer, start_operator: Any) -> None:
    progress = TrainingProgress()
    operator = start_operator(progress, reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    progress.finished = True
    wait_phase(kube, "Succeeded")
    wait_members(kube, [])
    time.sleep(1.0)

    def reconciles() -> float:
        return operator.metrics.value("flowlane_operator_reconciles_total", {"kind": "FlowRun", "result": "ok"})

    before, done = counts(kmock_server), reconciles()
    time.sleep(2.0)
    assert operator_requests(before, counts(kmock_server)) == {}
    assert reconciles() == done

