"""Status you can trust: the conditions a FlowRun reports, the events it posts, and API rejections
(a ResourceQuota, an admission webhook) that reach its status instead of a log line."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kmock
import yaml
from fixtures_kube import EVENTS, FLOWRUNS, PODS, SECRETS, FakeProgress, KMockServer, KubeApi, wait_until
from test_operator import (
    MEMBERS,
    body,
    condition,
    epochs,
    events,
    fail_pod,
    flowrun,
    plan,
    pods_for,
    posted,
    run_group,
    status,
    wait_members,
    wait_phase,
)

from flowlane.api.flowrun import load_flowrun
from flowlane.operator.kube_client import NODES
from flowlane.operator.reconcile import Progress, RunChildren, plan_flowrun
from flowlane.operator.render import RenderOptions, render_flowrun
from flowlane.operator.settings import ClusterDefaults

from test_operator import NOW  # isort: skip


def conditions(result: Any) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result.status["conditions"]}


def whole_run(obj: dict[str, Any], pods: list[dict[str, Any]]) -> Any:
    """A plan of a run whose Services, ConfigMap, NetworkPolicy and budget all exist, with these pods."""
    rendered = render_flowrun(load_flowrun(yaml.safe_dump(obj)), epoch=0)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for child in rendered.static_children():
        kinds.setdefault(child["kind"], []).append(child)
    children = RunChildren(pods=pods, services=kinds["Service"], config_maps=kinds["ConfigMap"],
                           network_policies=kinds["NetworkPolicy"], disruption_budgets=kinds["PodDisruptionBudget"])
    return plan_flowrun(obj, children, None, NOW, RenderOptions(), ClusterDefaults())


def test_a_checkpoint_sets_checkpointed_with_its_uri_and_step() -> None:
    obj = body(status={"phase": "Running"})
    result = plan(obj, pods_for(obj, epoch=0), Progress(step=10, last_checkpoint="s3://b/x/step-10"))
    checkpointed = conditions(result)["Checkpointed"]
    assert (checkpointed["status"], checkpointed["reason"], checkpointed["message"]) == (
        "True", "CheckpointWritten", "s3://b/x/step-10 (step 10)")


def test_a_run_without_a_checkpoint_has_no_checkpointed_condition() -> None:
    obj = body(status={"phase": "Running"})
    assert "Checkpointed" not in conditions(plan(obj, pods_for(obj, epoch=0), Progress(step=3)))


def test_a_running_group_is_admitted_running_and_not_degraded() -> None:
    obj = body("{rollout: {replicas: 2}, storage: {checkpointUri: 's3://b/x'}}", status={"phase": "Pending"})
    found = conditions(whole_run(obj, pods_for(obj, epoch=0)))
    assert {t: (c["status"], c["reason"]) for t, c in found.items()} == {
        "Accepted": ("True", "Valid"), "Admitted": ("True", "PodsCreated"), "Ready": ("True", "AllPodsRunning"),
        "Running": ("True", "AllPodsRunning")}
    assert found["Admitted"]["message"] == "the API server took all 4 pods"


def test_a_rollout_worker_down_while_the_learner_runs_is_rollout_degraded() -> None:
    obj = body("{rollout: {replicas: 2}, storage: {checkpointUri: 's3://b/x'}}", status={"phase": "Running"})
    pods = pods_for(obj, epoch=0)
    next(p for p in pods if p["metadata"]["name"] == "demo-rollout-1")["status"]["phase"] = "Pending"
    found = conditions(whole_run(obj, pods))
    assert (found["RolloutDegraded"]["status"], found["RolloutDegraded"]["reason"],
            found["RolloutDegraded"]["message"]) == ("True", "WorkersNotRunning",
                                                     "1/2 rollout workers not running: rollout-1")
    assert found["Running"]["status"] == "False"
    healed = whole_run({**obj, "status": whole_run(obj, pods).status}, pods_for(obj, epoch=0))
    assert (conditions(healed)["RolloutDegraded"]["status"], conditions(healed)["RolloutDegraded"]["reason"]) == (
        "False", "AllWorkersRunning")


def test_a_refused_create_reaches_status_and_an_event() -> None:
    obj = body(status={"phase": "Pending"})
    refusal = 'Pod demo-learner: pods "demo-learner" is forbidden: exceeded quota: gpus, requested: 1, limited: 0'
    result = plan_flowrun(obj, RunChildren(rejected=[refusal]), None, NOW, RenderOptions(), ClusterDefaults())
    assert result.status["phase"] == "Pending"
    assert result.status["message"] == f"the API server refused pods: {refusal}"
    admitted = conditions(result)["Admitted"]
    assert (admitted["status"], admitted["reason"], admitted["message"]) == ("False", "CreateRejected", refusal)
    assert [(e.type.value, e.reason) for e in result.events] == [("Warning", "CreateRejected")]
    again = plan_flowrun({**obj, "status": result.status}, RunChildren(rejected=[refusal]), None, NOW,
                         RenderOptions(), ClusterDefaults())
    assert again.events == []  # the same refusal is reported once


def test_every_group_restart_posts_an_event_even_while_restarting() -> None:
    obj = body(status={"phase": "Restarting", "restartCount": 1})
    pods = pods_for(obj, epoch=1)
    pods[0]["status"]["phase"] = "Failed"
    result = plan(obj, pods)
    assert result.status["restartCount"] == 2
    assert [(e.type.value, e.reason) for e in result.events] == [("Warning", "GroupRestart")]


def test_a_quota_refusal_from_the_api_server_reaches_status_and_clears_once_it_is_lifted(
        kube: KubeApi, kmock_server: KMockServer, start_operator: Any) -> None:
    quota = {"exceeded": True}

    def refuse(request: Any) -> None:
        meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
        if quota["exceeded"] and request.resource.plural == "pods" and request.namespace == kube.namespace \
                and meta.get("name") == "quota-demo-learner":
            raise kmock.KubernetesError(status=403, reason="Forbidden", message=(
                'pods "quota-demo-learner" is forbidden: exceeded quota: team-a, requested: cpu=1, limited: cpu=0'))

    emulator = kmock_server.emulator
    assert emulator is not None
    kmock_server.call(lambda: emulator.admission.append(refuse))
    start_operator(reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("quota-demo"))
    refused = wait_until(lambda: condition(kube, "Admitted", "quota-demo") or None, what="Admitted")
    assert (refused["status"], refused["reason"]) == ("False", "CreateRejected")
    assert refused["message"].startswith('Pod quota-demo-learner: pods "quota-demo-learner" is forbidden: exceeded')
    assert status(kube, "quota-demo")["message"].startswith("the API server refused pods: Pod quota-demo-learner")
    assert [e["message"] for e in posted(kube, "CreateRejected")] == [
        "the API server refused pods: " + refused["message"]]
    assert "quota-demo-learner" not in kube.names(PODS)
    time.sleep(1.0)  # three reconciles later: still refused, still reported once
    assert condition(kube, "Admitted", "quota-demo")["reason"] == "CreateRejected"
    assert len(events(kube, "CreateRejected")) == 1
    quota["exceeded"] = False
    wait_until(lambda: "quota-demo-learner" in kube.names(PODS), what="the learner created once the quota allows")
    wait_until(lambda: len(kube.names(PODS, {"flowlane.dev/flowrun": "quota-demo"})) == 4, what="all pods")
    wait_until(lambda: condition(kube, "Admitted", "quota-demo").get("status") == "True", what="Admitted")
    run_group(kube, "quota-demo")
    kmock_server.call(lambda: emulator.admission.remove(refuse))


def test_a_group_restart_and_phase_changes_post_events(kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    fail_pod(kube, "demo-rollout-0")
    wait_phase(kube, "Restarting")

    def reasons() -> set[str]:
        return {e.get("reason") for e in kube.objects(EVENTS) if e.get("involvedObject", {}).get("name") == "demo"}

    # kopf posts events in the background, after the status patch that made the phase visible
    wait_until(lambda: {"Running", "GroupRestart"} <= reasons() or None, what="the Running and GroupRestart events")


QUEUED = "{podTemplate: {labels: {kueue.x-k8s.io/queue-name: team-a}}, storage: {checkpointUri: 's3://b/x'}}"


def gated(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**p, "spec": {**p["spec"], "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
             "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                            "reason": "SchedulingGated"}]}} for p in pods]


def test_a_run_whose_pods_kueue_holds_is_pending_and_not_admitted_without_a_stuck_warning() -> None:
    obj = body(QUEUED, status={"phase": "Pending"})
    result = whole_run(obj, gated(pods_for(obj, epoch=0)))
    found = conditions(result)
    assert (found["Admitted"]["status"], found["Admitted"]["reason"]) == ("False", "Queued")
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "Queued")
    assert result.status["phase"] == "Pending"
    assert result.status["message"] == "waiting for Kueue to admit pod group demo-0 from queue team-a: 3/3 pods held"
    assert [e.reason for e in result.events] == []


def test_a_run_kueue_admitted_runs() -> None:
    obj = body(QUEUED, status={"phase": "Pending"})
    held = whole_run(obj, gated(pods_for(obj, epoch=0)))
    admitted = whole_run({**obj, "status": held.status}, pods_for(obj, epoch=0))
    assert admitted.status["phase"] == "Running"
    assert (conditions(admitted)["Admitted"]["status"], conditions(admitted)["Admitted"]["reason"]) == (
        "True", "PodsCreated")


def test_a_queued_flowrun_stays_pending_until_kueue_admits_it_then_runs(kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("queued", podTemplate={"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}))
    wait_until(lambda: len(kube.names(PODS, {"flowlane.dev/flowrun": "queued"})) == 4, what="the pods")
    pods = kube.names(PODS, {"flowlane.dev/flowrun": "queued"})
    for name in pods:  # play Kueue's webhook: hold every pod of the group
        kube.patch(PODS, name, {"spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}})
    message = "waiting for Kueue to admit pod group queued-0 from queue team-a: 4/4 pods held"
    held = wait_until(lambda: status(kube, "queued") if status(kube, "queued").get("message") == message else None,
                      what="the run held in its queue")
    assert held["phase"] == "Pending"
    assert (condition(kube, "Admitted", "queued")["status"], condition(kube, "Admitted", "queued")["reason"]) == (
        "False", "Queued")
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"]
            for p in kube.objects(PODS, {"flowlane.dev/flowrun": "queued"})} == {"queued-0"}
    for name in pods:  # admission: Kueue lifts the gates, the pods start
        kube.patch(PODS, name, {"spec": {"schedulingGates": None}})
    run_group(kube, "queued")
    assert condition(kube, "Admitted", "queued")["status"] == "True"


# -- node loss --------------------------------------------------------------------------------------


def evicted_from(pod: dict[str, Any], node: str, deleted_s_ago: float) -> dict[str, Any]:
    """``pod`` as the node lifecycle controller leaves it on a lost node: Terminating, DisruptionTarget."""
    when = (NOW - timedelta(seconds=deleted_s_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": when},
            "spec": {**pod["spec"], "nodeName": node},
            "status": {"phase": "Running", "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]}}


def test_a_member_evicted_from_a_lost_node_restarts_the_group_and_is_force_deleted() -> None:
    obj = body(status={"phase": "Running"})
    pods = pods_for(obj, epoch=0)
    pods[0] = evicted_from(pods[0], "node-a", deleted_s_ago=120)
    result = plan_flowrun(obj, RunChildren(pods=pods, lost_nodes=frozenset({"node-a"})), None, NOW,
                          RenderOptions(), ClusterDefaults())
    assert result.status["restartCount"] == 1
    assert result.status["message"] == "pod demo-learner was evicted from node node-a; restarting the group (1/3)"
    assert [p["metadata"]["name"] for p in result.force_delete] == ["demo-learner"]


def test_a_stuck_pod_is_force_deleted_only_on_a_lost_node_and_past_its_deadline() -> None:
    obj = body(status={"phase": "Restarting", "restartCount": 1})
    old = [evicted_from(p, "node-a", deleted_s_ago=120) for p in pods_for(obj, epoch=0)]

    def forced(pods: list[dict[str, Any]], lost: frozenset[str]) -> list[str]:
        result = plan_flowrun(obj, RunChildren(pods=pods, lost_nodes=lost), None, NOW, RenderOptions(),
                              ClusterDefaults())
        return sorted(p["metadata"]["name"] for p in result.force_delete)

    assert forced(old, frozenset({"node-a"})) == ["demo-learner", "demo-rollout-0", "demo-sandbox-0"]
    assert forced(old, frozenset()) == []  # a slow kubelet on a live node finishes the deletion itself
    recent = [evicted_from(p, "node-a", deleted_s_ago=10) for p in pods_for(obj, epoch=0)]
    assert forced(recent, frozenset({"node-a"})) == []


def test_a_run_recovers_from_a_lost_node_within_its_backoff_budget(
        kube: KubeApi, kmock_server: KMockServer, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("lost"))
    wait_members(kube, MEMBERS, "lost")
    run_group(kube, "lost")
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{kube.namespace}-a"},  # its kubelet is gone
            "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}}
    kube.http.post(NODES.cluster_path("").rstrip("/"), json=node).raise_for_status()
    # The learner's node is lost: the taint manager evicts the pod, whose kubelet never confirms it.
    kube.patch(PODS, "lost-learner", {"spec": {"nodeName": f"{kube.namespace}-a"}})
    kube.set_pod_phase("lost-learner", "Running", conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}])
    stuck = datetime.now(UTC) - timedelta(seconds=90)
    kube.patch(PODS, "lost-learner", {"metadata": {"deletionTimestamp": stuck.strftime("%Y-%m-%dT%H:%M:%SZ")}})
    wait_until(lambda: status(kube, "lost").get("restartCount") == 1, what="a group restart")
    wait_until(lambda: epochs(kube, "lost") == {"1"} and len(kube.names(PODS, {"flowlane.dev/flowrun": "lost"})) == 4,
               what="the group recreated at epoch 1, the stuck learner gone")
    run_group(kube, "lost")
    assert status(kube, "lost")["restartCount"] == 1


# -- weights sync ------------------------------------------------------------------------------------


def synced(obj: dict[str, Any], progress: Progress) -> tuple[str, str, str]:
    weights = conditions(plan(obj, pods_for(obj, epoch=0), progress))["WeightsSynced"]
    return weights["status"], weights["reason"], weights["message"]


def test_weights_synced_names_the_workers_behind_or_missing() -> None:
    obj = body("{rollout: {replicas: 3}, storage: {checkpointUri: 's3://b/x'}}", status={"phase": "Running"})
    at = {"rollout-0": 7, "rollout-1": 7, "rollout-2": 7}
    assert synced(obj, Progress(policy_version=7, worker_policy_versions=at)) == (
        "True", "AllWorkersSynced", "3 rollout workers on policy version 7")
    assert synced(obj, Progress(policy_version=8, worker_policy_versions={**at, "rollout-0": 8, "rollout-2": 6})) == (
        "False", "WorkersBehind", "rollout-1 at version 7, rollout-2 at version 6; the learner is at version 8")
    assert synced(obj, Progress(policy_version=7, worker_policy_versions={"rollout-1": 7})) == (
        "False", "WorkerMissing",
        "no trajectory since (re)start from rollout-0, rollout-2; the learner is at version 7")


def test_a_learner_that_reports_no_worker_versions_sets_no_weights_synced_condition() -> None:
    obj = body(status={"phase": "Running"})
    assert "WeightsSynced" not in conditions(plan(obj, pods_for(obj, epoch=0), Progress(step=3, policy_version=3)))

@contextlib.asynccontextmanager
async def served_learner(runtime: Any, kube: KubeApi, kmock_server: KMockServer
                         ) -> AsyncIterator[tuple[Any, Any, str]]:
    """``runtime`` (a ``LearnerRuntime``) behind a real gRPC learner server, and the operator's
    progress source that reads it with the token from a Secret, as the operator does: yields the
    source, the run's ``RunRef`` and the server's address."""
    import kopf

    from flowlane.api import learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server
    from flowlane.operator.graph import SecretEnv
    from flowlane.operator.kube_client import KubeClient
    from flowlane.operator.progress import GrpcProgressSource
    from flowlane.operator.reconcile import RunRef
    from flowlane.trainer.learner_service import make_servicer

    kube.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"},
                          "stringData": {"token": "s3cret"}})
    server = create_server("s3cret")
    learner_pb2_grpc.add_LearnerServicer_to_server(make_servicer(runtime), server)
    address = f"127.0.0.1:{bind_port(server, '127.0.0.1', 0)}"
    await server.start()
    client = KubeClient(kopf.ConnectionInfo(server=kmock_server.url, insecure=True))
    source = GrpcProgressSource(client)
    ref = RunRef(kube.namespace, "demo", address, SecretEnv("tok", "token"))
    try:
        yield source, ref, address
    finally:
        await client.close()
        await server.stop(None)



def test_staleness_sync_time_and_worker_versions_reach_the_status() -> None:
    obj = body(status={"phase": "Running", "workerPolicyVersions": {"rollout-0": 1, "rollout-1": 1}})
    result = plan(obj, pods_for(obj, epoch=0), Progress(
        policy_version=4, worker_policy_versions={"rollout-1": 4, "rollout-0": 3}, staleness=1,
        last_weight_sync_seconds=0.5))
    assert (result.status["workerPolicyVersions"], result.status["staleness"],
            result.status["lastWeightSyncSeconds"]) == ({"rollout-0": 3, "rollout-1": 4}, 1, 0.5)
    restarted = plan(obj, pods_for(obj, epoch=0), Progress(policy_version=4, worker_policy_versions={"rollout-1": 4}))
    assert restarted.status["workerPolicyVersions"] == {"rollout-1": 4}  # the learner's map replaces the old one


async def test_the_learners_worker_versions_reach_weights_synced_over_grpc(
        kube: KubeApi, kmock_server: KMockServer, tmp_path: Any) -> None:
    """The real learner service records the version of each worker's trajectories; GetStatus serves
    them with the staleness and the sync time; the operator's progress source reads them back."""

    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.api.flowrun import FlowRun, Phase
    from flowlane.api.trajectory import PlannerTurn, Trajectory
    from flowlane.kit.grpc_common import open_channel, trajectory_to_record
    from flowlane.trainer.learner_service import LearnerRuntime

    class Policy:
        policy_version = 3

    runtime = LearnerRuntime(FlowRun.model_validate({"metadata": {"name": "demo"}, "spec": {
        "rollout": {"replicas": 2}, "algorithm": {"groupSize": 2, "batchQuestions": 2}}}), tmp_path)
    runtime.learner = Policy()  # type: ignore[assignment]
    runtime.weights_cache = (3, [])
    runtime.weight_sync.published(3, 0.25)
    runtime.progress.phase = Phase.RUNNING
    obj = body("{rollout: {replicas: 2}, storage: {checkpointUri: 's3://b/x'}}", status={"phase": "Running"})

    async def work(stub: Any, worker: str, version: int) -> None:
        batch = await stub.GetTasks(learner_pb2.TaskRequest(worker_id=worker, max_tasks=1))
        turn = PlannerTurn(prompt_ids=[1], response_ids=[2], logprobs=[-0.5], policy_version=version, text="x")
        records = [trajectory_to_record(Trajectory(question=t.question, question_id=t.question_id,
                                                   planner_turns=[turn], reward=1.0), t.unit_id, worker)
                   for t in batch.tasks]

        async def chunks() -> Any:
            yield learner_pb2.TrajectoryChunk(trajectories=records)

        await stub.SubmitTrajectories(chunks())

    async def weights_synced() -> tuple[Progress, tuple[str, str, str]]:
        progress = await source(ref)
        assert progress is not None
        return progress, synced(obj, progress)

    async with (served_learner(runtime, kube, kmock_server) as (source, ref, address),
                open_channel(address, "s3cret") as channel):
        stub = learner_pb2_grpc.LearnerStub(channel)
        async for _ in stub.GetWeights(learner_pb2.WeightsRequest(min_version=3)):
            pass  # a transfer of version 3: it counts towards the sync time
        await work(stub, "rollout-0/a", 3)
        await work(stub, "rollout-1/a", 2)
        progress, weights = await weights_synced()
        assert (dict(progress.worker_policy_versions or {}), progress.staleness) == (
            {"rollout-0": 3, "rollout-1": 2}, 1)
        assert progress.last_weight_sync_seconds is not None and 0.25 <= progress.last_weight_sync_seconds < 5
        assert weights == ("False", "WorkersBehind", "rollout-1 at version 2; the learner is at version 3")
        # rollout-1 restarts: its new process has loaded nothing the learner has seen yet
        await stub.GetTasks(learner_pb2.TaskRequest(worker_id="rollout-1/b", max_tasks=1))
        progress, weights = await weights_synced()
        assert (dict(progress.worker_policy_versions or {}), progress.staleness) == ({"rollout-0": 3}, 0)
        assert weights == ("False", "WorkerMissing",
                           "no trajectory since (re)start from rollout-1; the learner is at version 3")
        await work(stub, "rollout-1/b", 3)
        assert (await weights_synced())[1] == ("True", "AllWorkersSynced", "2 rollout workers on policy version 3")


def test_a_running_run_reports_weights_synced_and_its_staleness(kube: KubeApi, start_operator: Any) -> None:
    progress = FakeProgress()
    start_operator(progress, reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("synced"))
    wait_members(kube, MEMBERS, "synced")
    run_group(kube, "synced")
    progress.set("synced", Progress(step=4, policy_version=4, worker_policy_versions={"rollout-0": 4, "rollout-1": 3},
                                    staleness=1, last_weight_sync_seconds=1.5))
    behind = wait_until(lambda: condition(kube, "WeightsSynced", "synced") or None, what="WeightsSynced")
    assert (behind["status"], behind["reason"], behind["message"]) == (
        "False", "WorkersBehind", "rollout-1 at version 3; the learner is at version 4")
    current = status(kube, "synced")
    assert (current["workerPolicyVersions"], current["staleness"], current["lastWeightSyncSeconds"]) == (
        {"rollout-0": 4, "rollout-1": 3}, 1, 1.5)
    progress.set("synced", Progress(step=4, policy_version=4, worker_policy_versions={"rollout-0": 4, "rollout-1": 4},
                                    staleness=0, last_weight_sync_seconds=1.5))
    wait_until(lambda: condition(kube, "WeightsSynced", "synced").get("status") == "True", what="WeightsSynced True")
    assert status(kube, "synced")["staleness"] == 0


# -- Kueue preemption ---------------------------------------------------------------------------------


def stopped_by_kueue(pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` as Kueue leaves it when it evicts the workload: TerminationTarget set, deletion under way."""
    return {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2025-01-01T00:00:00Z"},
            "status": {"phase": "Running", "conditions": [
                {"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvictedDueToPreempted",
                 "message": "Preempted to accommodate a workload (UID: u-1) in the ClusterQueue"}]}}


def test_a_kueue_preemption_suspends_the_run_without_consuming_its_backoff() -> None:
    obj = body(QUEUED, status={"phase": "Running", "restartCount": 1})
    pods = pods_for(obj, epoch=1)
    pods[0] = stopped_by_kueue(pods[0])  # Kueue deletes the pods one by one: the others still run
    result = plan(obj, pods, Progress(step=12, last_checkpoint="s3://b/x/step-12"))
    message = ("preempted by Kueue (WorkloadEvictedDueToPreempted: Preempted to accommodate a workload (UID: u-1) "
               "in the ClusterQueue); checkpoint s3://b/x/step-12 (step 12) kept; it resumes when Kueue re-admits "
               "the pod group")
    assert (result.status["phase"], result.status["message"], result.status["restartCount"]) == (
        "Suspended", message, 1)
    found = conditions(result)
    assert (found["Suspended"]["status"], found["Suspended"]["reason"]) == ("True", "Preempted")
    assert (found["Admitted"]["status"], found["Admitted"]["reason"]) == ("False", "Preempted")
    assert sorted(p["metadata"]["name"] for p in result.delete) == ["demo-rollout-0", "demo-sandbox-0"]
    assert [c["kind"] for c in result.create if c["kind"] == "Pod"] == []
    assert [(e.type.value, e.reason, e.message) for e in result.events] == [("Warning", "Preempted", message)]


def test_a_preempted_run_stays_suspended_while_queued_and_runs_again_on_readmission() -> None:
    obj = body(QUEUED, status={"phase": "Running"})
    preempted = plan(obj, [stopped_by_kueue(p) for p in pods_for(obj, epoch=0)], None)
    gone = whole_run({**obj, "status": preempted.status}, [])  # Kueue's finalizer let the old pods go
    assert sorted(p["metadata"]["name"] for p in gone.create) == ["demo-learner", "demo-rollout-0", "demo-sandbox-0"]
    assert {p["metadata"]["labels"]["flowlane.dev/epoch"] for p in gone.create} == {"0"}  # the same pod group
    assert gone.status["phase"] == "Suspended" and gone.events == []
    held = whole_run({**obj, "status": gone.status}, gated(pods_for(obj, epoch=0)))
    assert (held.status["phase"], held.status["message"]) == (
        "Suspended", "preempted; waiting for Kueue to admit pod group demo-0 from queue team-a: 3/3 pods held")
    readmitted = whole_run({**obj, "status": held.status}, pods_for(obj, epoch=0))
    assert (readmitted.status["phase"], readmitted.status["restartCount"]) == ("Running", 0)
    assert (conditions(readmitted)["Suspended"]["status"], conditions(readmitted)["Suspended"]["reason"]) == (
        "False", "Readmitted")
    assert [e.reason for e in readmitted.events] == ["Running"]


def test_preemption_checkpoints_then_suspends_and_readmission_resumes(kube: KubeApi, start_operator: Any) -> None:
    progress = FakeProgress()
    start_operator(progress, reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("pre", podTemplate={"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}))
    wait_members(kube, MEMBERS, "pre")
    run_group(kube, "pre")
    progress.set("pre", Progress(step=7, last_checkpoint="s3://ckpt/pre/step-5"))
    progress.saved["pre"] = Progress(step=7, last_checkpoint="s3://ckpt/pre/step-7")
    pods = kube.names(PODS, {"flowlane.dev/flowrun": "pre"})
    # Play Kueue's Stop on its first pod: TerminationTarget, then the deletion its finalizer holds up.
    # The operator stops the rest of the group itself (the emulator deletes those at once).
    # (one write, so that no reconcile sees the condition without the deletion)
    kube.patch(PODS, "pre-rollout-0", {"metadata": {"finalizers": ["kueue.x-k8s.io/managed"]}})  # its webhook's
    kube.patch(PODS, "pre-rollout-0", {
        "metadata": {"deletionTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
        "status": {"phase": "Running", "conditions": [
            {"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvictedDueToPreempted",
             "message": "Preempted to accommodate a higher priority Workload"}]}})
    suspended = wait_phase(kube, "Suspended", "pre")
    assert progress.checkpointed == ["pre"]  # asked once, before the group went
    assert "checkpoint s3://ckpt/pre/step-7 (step 7) kept" in suspended["message"]
    assert suspended["restartCount"] == 0 and suspended["lastCheckpoint"] == "s3://ckpt/pre/step-7"
    assert [e["type"] for e in posted(kube, "Preempted")] == ["Warning"]
    wait_until(lambda: kube.names(PODS, {"flowlane.dev/flowrun": "pre"}) == ["pre-rollout-0"],
               what="the rest of the group stopped")
    kube.patch(PODS, "pre-rollout-0", {"metadata": {"finalizers": None}})  # Kueue lets it go ...
    if kube.get(PODS, "pre-rollout-0") is not None:
        kube.delete(PODS, "pre-rollout-0")

    def recreated() -> bool:
        group = kube.objects(PODS, {"flowlane.dev/flowrun": "pre"})
        return len(group) == 4 and not any(p["metadata"].get("deletionTimestamp") for p in group)

    wait_until(recreated, what="... and the operator creates the group again")
    assert epochs(kube, "pre") == {"0"}
    for name in pods:  # Kueue's webhook holds the new pods until the workload is re-admitted
        kube.patch(PODS, name, {"spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}})
    wait_until(lambda: status(kube, "pre").get("message", "").startswith("preempted; waiting for Kueue"),
               what="the run waiting for re-admission")
    assert status(kube, "pre")["phase"] == "Suspended"
    for name in pods:
        kube.patch(PODS, name, {"spec": {"schedulingGates": None}})
    run_group(kube, "pre")
    assert status(kube, "pre")["restartCount"] == 0
    assert (condition(kube, "Suspended", "pre")["status"], condition(kube, "Suspended", "pre")["reason"]) == (
        "False", "Readmitted")
    assert progress.checkpointed == ["pre"]


async def test_the_learner_checkpoints_on_request_after_the_step_in_flight(
        kube: KubeApi, kmock_server: KMockServer, tmp_path: Any) -> None:
    """The real learner service's Checkpoint RPC, through the operator's progress source: it waits for
    a step in flight, writes the last completed step once, and answers the status that names it."""
    import asyncio
    import json

    from flowlane.api.flowrun import FlowRun, Phase
    from flowlane.kit.checkpoints import CheckpointStore
    from flowlane.trainer.learner_service import LearnerRuntime

    class Writer:  # the learner's checkpoint part: a model config and one weights file
        model_dir = tmp_path / "model"
        policy_version = 4

        def save_checkpoint_files(self, target: Any) -> dict[str, Any]:
            (target / "model.bin").write_bytes(b"weights")
            return {}

    Writer.model_dir.mkdir()
    (Writer.model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (tmp_path / "run").mkdir()
    runtime = LearnerRuntime(FlowRun.model_validate({"metadata": {"name": "demo"}, "spec": {}}), tmp_path / "run")
    runtime.learner = Writer()  # type: ignore[assignment]
    runtime.store = CheckpointStore.from_uri(f"file://{tmp_path / 'ckpt'}", keep_last=3)
    runtime.progress.phase = Phase.RUNNING
    async with served_learner(runtime, kube, kmock_server) as (source, ref, _address):
        assert (await source.checkpoint(ref, 10)).last_checkpoint is None  # type: ignore[union-attr]  # no step yet
        async with runtime._model_lock:  # a step in flight: its update done, the step not yet recorded
            asked = asyncio.create_task(source.checkpoint(ref, 10))
            await asyncio.sleep(0.3)
            assert not asked.done() and runtime.store.latest() is None
            runtime.coordinator.learned_step, runtime.progress.step = 6, 6
            runtime._dirty_since_checkpoint = True
        saved = await asyncio.wait_for(asked, 10)
        assert saved is not None and (saved.step, saved.last_checkpoint) == (
            6, f"{runtime.store.location}/step-00000006")
        again = await source.checkpoint(ref, 10)  # nothing new since: no second write of step 6
        assert again is not None and again.last_checkpoint == saved.last_checkpoint
        assert [r.name for r in runtime.store.list()] == ["step-00000006"]


# -- a group start without Kueue --------------------------------------------------------------------------


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient cpu."}]}


def test_a_group_the_scheduler_places_in_part_is_pending_and_names_what_waits() -> None:
    obj = body("{rollout: {replicas: 2}, storage: {checkpointUri: 's3://b/x'}}", status={"phase": "Pending"})
    pods = pods_for(obj, epoch=0)
    for pod in pods:
        if pod["metadata"]["name"] in ("demo-rollout-1", "demo-sandbox-0"):
            pod["status"] = UNSCHEDULABLE
    result = whole_run(obj, pods)
    message = ("waiting for the whole group: the scheduler cannot place 2 of 4 pods: rollout-1: 0/3 nodes are "
               "available: 3 Insufficient cpu.; sandbox-0: 0/3 nodes are available: 3 Insufficient cpu.")
    assert (result.status["phase"], result.status["message"]) == ("Pending", message)
    found = conditions(result)
    assert [(found[t]["status"], found[t]["reason"]) for t in ("Ready", "Running")] == [
        ("False", "Unschedulable"), ("False", "Unschedulable")]
    assert [(e.type.value, e.reason, e.message) for e in result.events] == [("Warning", "Unschedulable", message)]
    again = whole_run({**obj, "status": result.status}, pods)
    assert again.events == []  # said once while it stays the same


def test_a_partly_placed_group_waits_in_pending_until_the_scheduler_places_the_rest(
        kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.3)
    kube.create(FLOWRUNS, flowrun("gang"))
    wait_members(kube, MEMBERS, "gang")
    for name in ("gang-learner", "gang-rollout-0", "gang-sandbox-0"):
        kube.set_pod_phase(name, "Running")
    kube.set_pod_phase("gang-rollout-1", "Pending", conditions=UNSCHEDULABLE["conditions"])
    wait_until(lambda: condition(kube, "Ready", "gang").get("reason") == "Unschedulable", what="Ready Unschedulable")
    current = status(kube, "gang")
    assert (current["phase"], current["message"]) == ("Pending", (
        "waiting for the whole group: the scheduler cannot place 1 of 4 pods: rollout-1: 0/3 nodes are available: "
        "3 Insufficient cpu."))
    assert [e["type"] for e in posted(kube, "Unschedulable")] == ["Warning"]
    kube.set_pod_phase("gang-rollout-1", "Running", conditions=[{"type": "PodScheduled", "status": "True"}])
    wait_phase(kube, "Running", "gang")
