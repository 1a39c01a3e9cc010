"""The operator: the real kopf operator against the KMock API emulator over HTTP, plus its pure core.

KMock stores objects but runs no controllers: no kubelet moves pods through their phases and no
garbage collector follows owner references. Tests play the kubelet (``set_pod_phase``) and the
Deployment controller (patching a Deployment's status) where a scenario needs them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kmock
import kopf
import yaml
from fixtures_kube import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    EVENTS,
    FLOWRUNS,
    FLOWSERVICES,
    NETWORK_POLICIES,
    PODS,
    SECRETS,
    SERVICES,
    FakeProgress,
    KMockServer,
    KubeApi,
    wait_until,
)

from flowlane.api.flowrun import load_flowrun
from flowlane.operator.reconcile import Progress, RunChildren, plan_flowrun
from flowlane.operator.render import RenderOptions, render_flowrun
from flowlane.operator.settings import ClusterDefaults

MEMBERS = ["learner", "rollout-0", "rollout-1", "sandbox-0"]


def flowrun(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": name},
            "spec": {"rollout": {"replicas": 2}, "storage": {"checkpointUri": f"s3://ckpt/{name}"}, **spec}}


def status(kube: KubeApi, name: str = "demo") -> dict[str, Any]:
    return (kube.get(FLOWRUNS, name) or {}).get("status") or {}


def condition(kube: KubeApi, type_: str, name: str = "demo") -> dict[str, Any]:
    return next((c for c in status(kube, name).get("conditions", []) if c["type"] == type_), {})


def wait_phase(kube: KubeApi, phase: str, name: str = "demo", timeout: float = 30) -> dict[str, Any]:
    return wait_until(lambda: status(kube, name) if status(kube, name).get("phase") == phase else None,
                      timeout, what=f"{name} phase {phase} (status: {status(kube, name)})")


def members(kube: KubeApi, run: str = "demo") -> list[str]:
    return [n.removeprefix(f"{run}-") for n in kube.names(PODS, {"flowlane.dev/flowrun": run})]


def wait_members(kube: KubeApi, expected: list[str], run: str = "demo", timeout: float = 30) -> None:
    wait_until(lambda: members(kube, run) == expected, timeout, what=f"pods {expected}, have {members(kube, run)}")


def epochs(kube: KubeApi, run: str = "demo") -> set[str]:
    return {p["metadata"]["labels"]["flowlane.dev/epoch"] for p in kube.objects(PODS, {"flowlane.dev/flowrun": run})}


def events(kube: KubeApi, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.objects(EVENTS) if e.get("reason") == reason]


def posted(kube: KubeApi, reason: str) -> list[dict[str, Any]]:
    """The events of ``reason``, once there is one: kopf posts events in the background, after the
    status patch that a test waited for."""
    return wait_until(lambda: events(kube, reason), what=f"a {reason} event")


def run_group(kube: KubeApi, run: str = "demo") -> None:
    kube.run_pods(run)
    wait_phase(kube, "Running", run)


def fail_pod(kube: KubeApi, name: str, exit_code: int = 137, reason: str = "OOMKilled") -> None:
    kube.set_pod_phase(name, "Failed", containerStatuses=[{
        "name": "c", "ready": False, "restartCount": 0, "image": "i", "imageID": "",
        "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}])


# -- FlowRun against KMock ------------------------------------------------------------------------


def test_applied_flowrun_gets_children_with_the_expected_specs(kube: KubeApi, start_operator: Any) -> None:
    operator = start_operator()
    created = kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    assert kube.names(SERVICES) == ["demo-learner", "demo-sandbox-0"]
    assert kube.names(CONFIG_MAPS) == ["demo-config"]
    assert kube.names(NETWORK_POLICIES) == ["demo-sandbox-policy"]
    assert kube.names(SECRETS) == ["demo-grpc-token"]
    token = kube.get(SECRETS, "demo-grpc-token")
    assert token is not None and len(token["stringData"]["token"]) >= 32
    config = load_flowrun(kube.get(CONFIG_MAPS, "demo-config")["data"]["run.yaml"])  # type: ignore[index]
    assert config.spec.rollout.replicas == 2 and config.spec.storage.checkpoint_uri == "s3://ckpt/demo"
    learner = kube.get(PODS, "demo-learner")
    assert learner is not None
    assert learner["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert learner["spec"]["containers"][0]["command"][:2] == ["flowlane", "learner"]
    current = wait_phase(kube, "Pending")
    assert current["observedGeneration"] == 1 and current["restartCount"] == 0
    assert condition(kube, "Accepted")["status"] == "True"
    run_group(kube)
    assert condition(kube, "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready", "status": "True", "reason": "AllPodsRunning", "message": "4 pods running",
        "lastTransitionTime": None, "observedGeneration": 1}
    assert operator.metrics.value("flowlane_operator_reconciles_total", {"kind": "FlowRun", "result": "ok"}) >= 2


def test_failed_rollout_pod_restarts_the_whole_group(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    fail_pod(kube, "demo-rollout-1")
    wait_until(lambda: status(kube).get("restartCount") == 1, what="restartCount 1")
    wait_until(lambda: members(kube) == MEMBERS and epochs(kube) == {"1"}, what="the group recreated at epoch 1")
    assert status(kube)["phase"] == "Restarting"
    assert condition(kube, "Restarting")["message"] == "pod demo-rollout-1 failed: OOMKilled (exit code 137)"
    restart_event = posted(kube, "GroupRestart")[0]
    assert restart_event["type"] == "Warning"
    assert restart_event["involvedObject"]["name"] == "demo"
    run_group(kube)
    assert condition(kube, "Restarting")["status"] == "False"
    assert status(kube)["restartCount"] == 1


def test_a_failed_second_learner_pod_restarts_the_whole_group(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun(learner={"replicas": 2}))
    pods = ["learner-0", "learner-1", "rollout-0", "rollout-1", "sandbox-0"]
    wait_members(kube, pods)
    run_group(kube)
    fail_pod(kube, "demo-learner-1", exit_code=1, reason="Error")
    wait_until(lambda: status(kube).get("restartCount") == 1, what="restartCount 1")
    wait_until(lambda: members(kube) == pods and epochs(kube) == {"1"}, what="the group recreated at epoch 1")
    assert condition(kube, "Restarting")["message"] == "pod demo-learner-1 failed: Error (exit code 1)"


def test_exceeding_backoff_limit_fails_the_run(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun(backoffLimit=1))
    wait_members(kube, MEMBERS)
    fail_pod(kube, "demo-learner", exit_code=1, reason="Error")
    wait_until(lambda: epochs(kube) == {"1"} and members(kube) == MEMBERS, what="first restart")
    fail_pod(kube, "demo-rollout-0", exit_code=2, reason="Error")
    failed = wait_phase(kube, "Failed")
    assert failed["restartCount"] == 1
    assert condition(kube, "Failed")["reason"] == "BackoffLimitExceeded"
    assert condition(kube, "Failed")["message"].startswith(
        "pod demo-rollout-0 failed: Error (exit code 2); restarted 1 times (backoffLimit 1)")
    wait_members(kube, ["rollout-0"])  # the failed pod stays for `kubectl logs`, the rest are stopped


def test_suspend_stops_the_pods_and_resume_starts_them_again(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    kube.patch(FLOWRUNS, "demo", {"spec": {"suspend": True}})
    wait_members(kube, [])
    suspended = wait_phase(kube, "Suspended")
    assert "startTime" not in suspended
    assert kube.names(CONFIG_MAPS) == ["demo-config"]  # everything but the pods stays
    kube.patch(FLOWRUNS, "demo", {"spec": {"suspend": False}})
    wait_members(kube, MEMBERS)
    assert condition(kube, "Suspended")["status"] == "False"
    run_group(kube)
    assert status(kube)["restartCount"] == 0


def test_learner_progress_appears_in_status(kube: KubeApi, start_operator: Any) -> None:
    progress = FakeProgress()
    progress.set("demo", Progress(step=7, total_steps=40, policy_version=7, reward=0.625, held_out_accuracy=0.3,
                                  baseline_accuracy=0.2, validation_accuracy=0.25,
                                  last_checkpoint="s3://ckpt/demo/step-6", best_checkpoint="s3://ckpt/demo/step-4",
                                  best_validation_accuracy=0.5, mlflow_run_id="abc123"))
    start_operator(progress=progress, reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    kube.run_pods("demo")
    current = wait_until(lambda: status(kube) if status(kube).get("step") == 7 else None, what="step 7")
    # The best checkpoint is the learner's, chosen by validation score, not the newest nor the test score's.
    assert {k: current[k] for k in ("step", "totalSteps", "reward", "heldOutAccuracy", "baselineAccuracy",
                                    "validationAccuracy", "lastCheckpoint", "bestCheckpoint",
                                    "bestValidationAccuracy", "mlflowRunId")} == {
        "step": 7, "totalSteps": 40, "reward": 0.625, "heldOutAccuracy": 0.3, "baselineAccuracy": 0.2,
        "validationAccuracy": 0.25, "lastCheckpoint": "s3://ckpt/demo/step-6",
        "bestCheckpoint": "s3://ckpt/demo/step-4", "bestValidationAccuracy": 0.5, "mlflowRunId": "abc123"}
    assert progress.asked[-1].learner_address == f"demo-learner.{kube.namespace}.svc:50051"


def test_learner_reporting_done_finishes_the_run(kube: KubeApi, start_operator: Any) -> None:
    progress = FakeProgress()
    start_operator(progress=progress, reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    progress.set("demo", Progress(step=40, finished=True))
    done = wait_phase(kube, "Succeeded")
    assert done["step"] == 40 and "completionTime" in done
    wait_members(kube, [])


def test_deleting_a_flowrun_removes_its_children(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    kube.delete(FLOWRUNS, "demo")
    try:
        wait_until(lambda: kube.get(FLOWRUNS, "demo") is None, what="the FlowRun gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the FlowRun: {kube.get(FLOWRUNS, 'demo')}") from None
    for kind in (PODS, SERVICES, CONFIG_MAPS, NETWORK_POLICIES, SECRETS):
        assert kube.names(kind) == [], kind


def test_operator_restarted_mid_reconcile_creates_no_duplicates(
    kube: KubeApi, start_operator: Any, kmock_server: KMockServer
) -> None:
    hung: list[float] = []

    async def hang() -> dict[str, Any]:  # the API server stores the pod, the response never comes in time
        hung.append(time.monotonic())
        await asyncio.sleep(3)
        return {}

    emulator = kmock_server.emulator
    assert emulator is not None
    rollout_0 = kmock.data({"metadata": {"name": "demo-rollout-0"}})
    kmock_server.call(lambda: emulator["post", rollout_0] << hang)  # type: ignore[index]
    first = start_operator()
    kube.create(FLOWRUNS, flowrun())
    wait_until(lambda: hung, what="the create of rollout-0 to hang")
    handled = "flowlane.dev/last-handled-configuration"
    assert handled not in kube.get(FLOWRUNS, "demo")["metadata"].get("annotations", {})  # type: ignore[index]
    first.stop()  # mid-reconcile: kopf never saw its create handler finish
    start_operator()
    wait_until(lambda: handled in kube.get(FLOWRUNS, "demo")["metadata"].get("annotations", {}),  # type: ignore[index]
               what="the new operator to finish the creation")
    run_group(kube)
    assert members(kube) == MEMBERS
    assert kube.names(SERVICES) == ["demo-learner", "demo-sandbox-0"]
    assert kube.names(CONFIG_MAPS) == ["demo-config"]
    assert kube.names(SECRETS) == ["demo-grpc-token"]
    assert status(kube)["restartCount"] == 0


def test_invalid_spec_fails_with_an_actionable_reason_and_the_operator_carries_on(
    kube: KubeApi, start_operator: Any
) -> None:
    start_operator()
    no_store = flowrun("nostore")
    del no_store["spec"]["storage"]
    kube.create(FLOWRUNS, no_store)
    kube.create(FLOWRUNS, {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": "junk"},
                           "spec": "garbage"})
    failed = wait_phase(kube, "Failed", "nostore")
    assert condition(kube, "Accepted", "nostore")["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.storage.checkpointUri: required on Kubernetes")
    assert wait_phase(kube, "Failed", "junk")["message"] == "spec: must be a mapping, got 'garbage'"
    kube.create(FLOWRUNS, flowrun("good"))
    wait_members(kube, MEMBERS, "good")
    assert members(kube, "nostore") == []
    kube.patch(FLOWRUNS, "nostore", {"spec": {"storage": {"checkpointUri": "s3://ckpt/nostore"}}})
    wait_members(kube, MEMBERS, "nostore")
    assert condition(kube, "Accepted", "nostore")["status"] == "True"


def test_missing_secret_keeps_the_run_pending_until_it_exists(kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun(storage={"checkpointUri": "s3://ckpt/demo", "credentialsSecret": {"name": "s3"}}))
    pending = wait_until(lambda: condition(kube, "Ready").get("reason") == "SecretNotFound", what="SecretNotFound")
    assert pending
    assert condition(kube, "Ready")["message"] == (
        f"Secret 's3' (spec.storage.credentialsSecret) not found in namespace {kube.namespace}: create it")
    assert members(kube) == []
    kube.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
                          "data": {"accessKey": base64.b64encode(b"a").decode(), "secretKey": "Yg=="}})
    wait_members(kube, MEMBERS)


def test_spec_change_rolls_the_pods_without_counting_a_restart(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWRUNS, flowrun())
    wait_members(kube, MEMBERS)
    run_group(kube)
    before = {p["metadata"]["name"]: p["metadata"]["annotations"]["flowlane.dev/spec-hash"] for p in kube.objects(PODS)}
    kube.patch(FLOWRUNS, "demo", {"spec": {"algorithm": {"lr": 0.0001}}})

    def rolled() -> bool:
        now = {p["metadata"]["name"]: p["metadata"]["annotations"]["flowlane.dev/spec-hash"]
               for p in kube.objects(PODS)}
        return set(now) == set(before) and all(now[n] != before[n] for n in now)

    wait_until(rolled, what="every pod recreated with the new spec")
    config = load_flowrun(kube.get(CONFIG_MAPS, "demo-config")["data"]["run.yaml"])  # type: ignore[index]
    assert config.spec.algorithm.lr == 0.0001
    run_group(kube)
    assert status(kube)["restartCount"] == 0 and status(kube)["observedGeneration"] == 2


def test_active_deadline_fails_the_run(kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun(activeDeadlineSeconds=1))
    wait_members(kube, MEMBERS)
    wait_phase(kube, "Failed", timeout=6)
    assert condition(kube, "Failed")["reason"] == "DeadlineExceeded"
    wait_members(kube, [])


def test_finished_run_is_deleted_after_its_ttl(kube: KubeApi, start_operator: Any) -> None:
    start_operator(reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun(ttlSecondsAfterFinished=1))
    wait_members(kube, MEMBERS)
    kube.set_pod_phase("demo-learner", "Succeeded")
    wait_phase(kube, "Succeeded")
    wait_until(lambda: kube.get(FLOWRUNS, "demo") is None, what="the FlowRun deleted by its TTL")


def test_health_endpoint_and_metrics_report_reconciles(kube: KubeApi, start_operator: Any) -> None:
    import socket

    import httpx
    from prometheus_client import generate_latest

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    operator = start_operator(health_port=port)
    kube.create(FLOWRUNS, flowrun())
    ok = {"kind": "FlowRun", "result": "ok"}
    wait_until(lambda: operator.metrics.value("flowlane_operator_reconciles_total", ok) >= 1, what="a reconcile")
    health = wait_until(lambda: _get_json(httpx, f"http://127.0.0.1:{port}/healthz"), what="/healthz")
    assert health["reconciles"] >= 1
    exposition = generate_latest(operator.metrics.registry).decode()
    assert 'flowlane_operator_reconciles_total{kind="FlowRun",result="ok"}' in exposition
    assert 'flowlane_operator_reconcile_seconds_count{kind="FlowRun"}' in exposition


def _get_json(httpx: Any, url: str) -> Any:
    try:
        response = httpx.get(url, timeout=2)
        return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def test_grpc_progress_source_reads_the_learners_status_rpc(kube: KubeApi, kmock_server: KMockServer) -> None:
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server
    from flowlane.operator.graph import SecretEnv
    from flowlane.operator.kube_client import KubeClient
    from flowlane.operator.progress import GrpcProgressSource
    from flowlane.operator.reconcile import RunRef

    class Learner(learner_pb2_grpc.LearnerServicer):
        async def GetStatus(self, request: Any, context: Any) -> Any:
            return learner_pb2.LearnerStatus(step=12, policy_version=12, reward_mean=0.75, held_out_accuracy=0.4,
                                             last_checkpoint="s3://b/step-10", mlflow_run_id="run-1",
                                             phase="Running", total_steps=40, validation_accuracy=0.5,
                                             best_checkpoint="s3://b/step-8", best_validation_accuracy=0.6,
                                             worker_policy_versions={"rollout-0": 12, "rollout-1": 11},
                                             staleness=1, last_weight_sync_s=0.75)

    for name, token in (("tok", b"s3cret"), ("wrong", b"guess")):
        kube.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                              "data": {"token": base64.b64encode(token).decode()}})
    server = create_server("s3cret")
    learner_pb2_grpc.add_LearnerServicer_to_server(Learner(), server)
    address = f"127.0.0.1:{bind_port(server, '127.0.0.1', 0)}"
    await server.start()
    client = KubeClient(kopf.ConnectionInfo(server=kmock_server.url, insecure=True))
    try:
        source = GrpcProgressSource(client)
        assert await source(RunRef(kube.namespace, "demo", address, SecretEnv("tok", "token"))) == Progress(
            step=12, total_steps=40, policy_version=12, reward=0.75, held_out_accuracy=0.4,
            validation_accuracy=0.5, last_checkpoint="s3://b/step-10", best_checkpoint="s3://b/step-8",
            best_validation_accuracy=0.6, mlflow_run_id="run-1", finished=False,
            worker_policy_versions={"rollout-0": 12, "rollout-1": 11}, staleness=1, last_weight_sync_seconds=0.75)
        assert await source(RunRef(kube.namespace, "demo", address, SecretEnv("wrong", "token"))) is None
    finally:
        await client.close()
        await server.stop(None)


# -- FlowService against KMock ----------------------------------------------------------------------


def flowservice(name: str = "agent", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowService", "metadata": {"name": name},
            "spec": {"model": {"flowRun": {"name": "demo"}}, "replicas": 2, **spec}}


def service_status(kube: KubeApi, name: str = "agent") -> dict[str, Any]:
    return (kube.get(FLOWSERVICES, name) or {}).get("status") or {}


def play_deployment_controller(kube: KubeApi, name: str, replicas: int) -> None:
    deployment = kube.get(DEPLOYMENTS, name)
    assert deployment is not None
    kube.patch(DEPLOYMENTS, name, {"status": {
        "observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
        "readyReplicas": replicas, "updatedReplicas": replicas}}, subresource="status")


def test_flowservice_serves_the_latest_checkpoint_and_rolls_to_a_new_one(
    kube: KubeApi, start_operator: Any
) -> None:
    start_operator(reconcile_interval_s=0.2)
    kube.create(FLOWRUNS, flowrun(algorithm={"minTurns": 2}))
    wait_members(kube, MEMBERS)
    kube.patch(FLOWRUNS, "demo", {"status": {"lastCheckpoint": "s3://ckpt/demo/step-10"}}, subresource="status")
    kube.create(FLOWSERVICES, flowservice())
    deployment = wait_until(lambda: kube.get(DEPLOYMENTS, "agent-gateway"), what="the gateway Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["flowlane.dev/checkpoint"] == "s3://ckpt/demo/step-10"
    command = template["spec"]["containers"][0]["command"]
    assert command[command.index("--min-turns") + 1] == "2"  # served as trained: the FlowRun's minTurns
    assert deployment["spec"]["replicas"] == 2
    assert kube.names(SERVICES, {"flowlane.dev/flowservice": "agent"}) == ["agent"]
    play_deployment_controller(kube, "agent-gateway", 2)
    ready = wait_until(lambda: service_status(kube) if service_status(kube).get("phase") == "Ready" else None,
                       what="the FlowService Ready")
    assert ready["servedCheckpoint"] == "s3://ckpt/demo/step-10"
    assert ready["readyReplicas"] == 2
    assert ready["endpoint"] == f"http://agent.{kube.namespace}.svc:8000/v1"

    kube.patch(FLOWRUNS, "demo", {"status": {"lastCheckpoint": "s3://ckpt/demo/step-20"}}, subresource="status")

    def rolled() -> bool:
        dep = kube.get(DEPLOYMENTS, "agent-gateway") or {}
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        return annotations["flowlane.dev/checkpoint"] == "s3://ckpt/demo/step-20"

    wait_until(rolled, what="the Deployment template on the new checkpoint")
    rolling = wait_until(lambda: service_status(kube) if service_status(kube).get("desiredCheckpoint")
                         == "s3://ckpt/demo/step-20" else None, what="the new desired checkpoint")
    assert rolling["servedCheckpoint"] == "s3://ckpt/demo/step-10"  # still served until the rollout ends
    play_deployment_controller(kube, "agent-gateway", 2)
    wait_until(lambda: service_status(kube).get("servedCheckpoint") == "s3://ckpt/demo/step-20",
               what="the new checkpoint served")


def test_deleting_a_flowservice_removes_its_children(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWSERVICES, flowservice(model={"uri": "s3://models/planner"}))
    wait_until(lambda: kube.get(DEPLOYMENTS, "agent-gateway"), what="the gateway Deployment")
    kube.delete(FLOWSERVICES, "agent")
    wait_until(lambda: kube.get(FLOWSERVICES, "agent") is None, what="the FlowService gone")
    for kind in (DEPLOYMENTS, SERVICES):
        assert kube.names(kind) == [], kind


def test_update_never_nulls_fields_the_api_server_owns() -> None:
    from flowlane.operator.kube_reconciler import merge_patch

    observed = {"metadata": {"name": "s"}, "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"],
                                                   "selector": {"a": "b"}, "ports": [], "extra": 1}}
    desired = {"metadata": {"name": "s", "labels": {"x": "y"}}, "spec": {"selector": {"a": "c"}, "ports": []}}
    assert merge_patch(observed, desired) == {"metadata": {"labels": {"x": "y"}, "annotations": {}},
                                              "spec": {"selector": {"a": "c"}, "extra": None}}


def test_flowservice_waits_for_a_checkpoint(kube: KubeApi, start_operator: Any) -> None:
    start_operator()
    kube.create(FLOWSERVICES, flowservice(model={"flowRun": {"name": "missing"}}))
    waiting = wait_until(lambda: service_status(kube) if service_status(kube).get("phase") else None,
                         what="a FlowService status")
    assert waiting["phase"] == "Pending"
    assert waiting["message"] == f"FlowRun 'missing' not found in namespace {kube.namespace}"
    assert kube.get(DEPLOYMENTS, "agent-gateway") is None


# -- the pure core -------------------------------------------------------------------------------


NOW = datetime(2025, 1, 1, tzinfo=UTC)


def body(spec: str = "{storage: {checkpointUri: 's3://b/x'}}", status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun",
           "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 1},
           "spec": yaml.safe_load(spec)}
    if status is not None:
        obj["status"] = status
    return obj


def pods_for(spec_body: dict[str, Any], epoch: int, phase: str = "Running") -> list[dict[str, Any]]:
    pods = render_flowrun(load_flowrun(yaml.safe_dump(spec_body)), epoch=epoch).pods
    return [{**p, "status": {"phase": phase}} for p in pods]


def plan(obj: dict[str, Any], pods: list[dict[str, Any]], progress: Progress | None = None) -> Any:
    return plan_flowrun(obj, RunChildren(pods=pods), progress, NOW, RenderOptions(), ClusterDefaults())


def test_pods_of_an_older_epoch_are_replaced_without_counting_another_restart() -> None:
    # The operator wrote restartCount=1 and died before deleting the old group.
    obj = body(status={"phase": "Restarting", "restartCount": 1})
    old = pods_for(obj, epoch=0)
    old[1]["status"]["phase"] = "Failed"
    result = plan(obj, old)
    assert result.status["restartCount"] == 1
    assert sorted(p["metadata"]["name"] for p in result.delete) == sorted(p["metadata"]["name"] for p in old)
    assert [o for o in result.create if o["kind"] == "Pod"] == []  # recreated once the old pods are gone


def test_a_failed_sandbox_is_replaced_alone() -> None:
    obj = body(status={"phase": "Running", "restartCount": 0})
    pods = pods_for(obj, epoch=0)
    sandbox = next(p for p in pods if p["metadata"]["name"] == "demo-sandbox-0")
    sandbox["status"]["phase"] = "Failed"
    result = plan(obj, pods)
    assert [p["metadata"]["name"] for p in result.delete] == ["demo-sandbox-0"]
    assert result.status["restartCount"] == 0


def test_an_unschedulable_pod_is_explained_in_the_ready_condition() -> None:
    obj = body(status={"phase": "Pending"})
    pods = pods_for(obj, epoch=0, phase="Pending")
    pods[0]["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    ready = next(c for c in plan(obj, pods).status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Unschedulable"
    assert ready["message"] == ("waiting for the whole group: the scheduler cannot place 1 of 3 pods: learner: "
                                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")


def test_a_garbage_status_is_ignored_not_fatal() -> None:
    result = plan(body(status={"phase": "Dancing", "restartCount": 2, "conditions": "x"}), [])
    assert result.status["phase"] == "Pending"
    assert result.status["restartCount"] == 2
    assert len(result.create) == 3 + 2 + 1 + 1 + 1  # pods, services, config map, network policy, disruption budget


def test_deadline_counts_from_the_start_time() -> None:
    start = (NOW - timedelta(seconds=61)).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = body("{storage: {checkpointUri: 's3://b/x'}, activeDeadlineSeconds: 60}",
               status={"phase": "Running", "startTime": start})
    result = plan(obj, pods_for(obj, epoch=0))
    assert result.status["phase"] == "Failed"
    assert len(result.delete) == 3
