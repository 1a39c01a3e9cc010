"""The cluster path end to end, as a platform engineer drives it: images, kubectl, pods in containers.

The one-machine cluster (``one_machine_cluster``) joins the API emulator, the operator from its
image and a node agent that runs the Pods the operator creates as containers built from
``images/``. The real ``kubectl`` applies the chart's CRDs and a short FlowRun (the default
example with fewer, smaller steps, a LoRA adapter, and the learner as two pods of one rank each); the run must
reach Running and then Succeeded inside the containers, with checkpoints in the S3 server and
metrics in MLflow, both reached from the pods. The two learner pods meet at learner-0's DNS name,
and the second uploads its own ZeRO shards to S3.

Faults, in containers, while it runs: after the first checkpoint the second learner pod's
container and the rollout worker's are killed together (the group restarts once, both learner
pods resume from S3, the step count continues and no trajectory is counted twice), and then
``kubectl delete pod`` removes the sandbox (the run still completes). Then a FlowService serving
``flowRun: {name, checkpoint: latest}`` answers the official ``openai`` client from its
container. Starting the engines in containers costs minutes on two cores (each group restart
starts them all again), so the behaviours are separate tests over one shared run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from node_agent import podman
from one_machine_cluster import IMAGES, REPO, OneMachineCluster

from flowlane.kit.checkpoints import MANIFEST_NAME

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(3000)]

RUN = "math-mini"
STEPS = 3
GROUP_SIZE = 2
QUESTIONS = 2


def short_example(cluster: OneMachineCluster, bucket: str) -> dict[str, Any]:
    """examples/flowrun.yaml with fewer, smaller steps, storage and tracking on the cluster's servers."""
    assert cluster.s3 is not None
    flowrun: dict[str, Any] = yaml.safe_load((REPO / "examples" / "flowrun.yaml").read_text())
    spec = flowrun["spec"]
    spec["model"].pop("fixed", None)  # one engine per rollout pod: two do not fit 2 cores
    # A LoRA adapter: a checkpoint of a full fine-tune moves ~1.6 GB through the S3 server (about
    # 3 min each on two cores), the adapter's some 30 MB. The local fault run (test_flowrun_e2e)
    # is the full fine-tune's, so both end to end runs together cover both.
    spec["model"]["lora"] = {"enabled": True}
    spec["algorithm"].update({"groupSize": GROUP_SIZE, "batchQuestions": QUESTIONS, "maxTurns": 1,
                              "maxPlannerTokens": 64, "skipUniformGroups": False, "lr": 1e-4})
    # One mid-run checkpoint to resume from, and the final one.
    spec["schedule"].update({"steps": STEPS, "checkpointInterval": 2, "evalInterval": 0, "evalLimit": 2,
                             "evalMaxTurns": 1})
    spec["storage"] = {"checkpointUri": f"s3://{bucket}/{RUN}", "s3Endpoint": cluster.s3.url,
                       "credentialsSecret": {"name": "s3-credentials"}}
    spec["tracking"] = {"mlflowUri": cluster.mlflow_uri, "experiment": "cluster-e2e"}
    for component in ("rollout", "learner"):
        spec[component] = {**spec.get(component, {}), "resources": {"cpu": "2", "memory": "8Gi"}}
    spec["learner"].update({"replicas": 2, "ranks": 1})
    spec["engine"] = {**spec.get("engine", {}), "zeroStage": 2}
    spec["backoffLimit"] = 4
    return flowrun


@dataclass
class ClusterRun:
    cluster: OneMachineCluster
    bucket: str
    timeline: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    killed: dict[str, str] = field(default_factory=dict)  # what -> the step it happened at
    final: dict[str, Any] = field(default_factory=dict)
    get_output: str = ""

    def status(self) -> dict[str, Any]:
        obj = self.cluster.get("flowrun", RUN)
        self.timeline.append((time.monotonic(), obj.get("status", {}).get("phase", ""), obj.get("status", {})))
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            if status.get("phase") == "Failed":
                break
            time.sleep(2)
        raise AssertionError(f"timed out waiting for {what}: status {json.dumps(status)[:2000]}\n"
                             f"operator:\n{self.cluster.operator_logs(60)}\n"
                             f"learner-0:\n{self.cluster.pod_logs(RUN + '-learner-0', 60)}\n"
                             f"learner-1:\n{self.cluster.pod_logs(RUN + '-learner-1', 30)}\n"
                             f"rollout:\n{self.cluster.pod_logs(RUN + '-rollout-0', 60)}")


def checkpoint_step(status: dict[str, Any]) -> int:
    match = re.search(r"step-(\d+)$", str(status.get("lastCheckpoint") or ""))
    return int(match.group(1)) if match else 0


def step_of(status: dict[str, Any]) -> int:
    return int((status.get("progress") or status).get("step") or 0)


@pytest.fixture(scope="module")
def cluster_run(cluster: OneMachineCluster) -> Iterator[ClusterRun]:
    assert cluster.s3 is not None
    crds = sorted(str(p) for p in (REPO / "charts" / "flowlane" / "crds").glob("*.yaml"))
    cluster.kubectl("apply", *[arg for path in crds for arg in ("-f", path)])
    cluster.kubectl("apply", "-f", "-", input=json.dumps(cluster.s3_secret()))
    run = ClusterRun(cluster, bucket=cluster.s3.make_bucket("cluster-e2e"))
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(short_example(cluster, run.bucket)))

    run.wait(lambda s: s.get("phase") == "Running", 900, "phase Running")
    # Right after the first checkpoint the second learner pod and the rollout worker die together:
    # the group restarts, both learner pods resume from S3, and the rollout's lost step is redone.
    first = run.wait(lambda s: bool(s.get("lastCheckpoint")) and step_of(s) >= 1, 900, "a first checkpoint")
    podman("kill", "--signal", "KILL", cluster.pod_container(f"{RUN}-learner-1"),
           cluster.pod_container(f"{RUN}-rollout-0"))
    run.killed["learner-1"] = run.killed["rollout"] = str(step_of(first))
    run.wait(lambda s: int(s.get("restartCount") or 0) >= 1 and s.get("phase") == "Running", 900,
             "a group restart after learner-1 and the rollout worker were killed")
    cluster.kubectl("delete", "pod", f"{RUN}-sandbox-0")
    run.killed["sandbox"] = str(step_of(run.status()))
    run.final = run.wait(lambda s: s.get("phase") == "Succeeded", 1800, "phase Succeeded")
    run.get_output = cluster.kubectl("get", "flowruns", "-o", "wide").stdout
    yield run


def test_the_flowrun_succeeds_in_containers_despite_killed_components(cluster_run: ClusterRun) -> None:
    phases = [phase for _, phase, _ in cluster_run.timeline]
    assert "Running" in phases
    assert cluster_run.final["phase"] == "Succeeded"
    assert set(cluster_run.killed) == {"learner-1", "rollout", "sandbox"}
    assert step_of(cluster_run.final) == STEPS


def test_the_learner_resumes_from_the_s3_checkpoint_and_the_step_count_continues(cluster_run: ClusterRun) -> None:
    logs = cluster_run.cluster.pod_logs(f"{RUN}-learner-0", 400)
    assert re.search(r"resumed from step-\d{8}", logs), logs[-3000:]
    steps = [step_of(s) for _, _, s in cluster_run.timeline]
    assert steps == sorted(steps)  # never counts back after a restart
    assert int(cluster_run.final["restartCount"]) >= 1


def test_checkpoints_land_in_s3_from_both_learner_pods(cluster_run: ClusterRun) -> None:
    s3 = cluster_run.cluster.s3
    assert s3 is not None
    names = {o.object_name for o in s3.client().list_objects(cluster_run.bucket, prefix=f"{RUN}/", recursive=True)}
    manifests = sorted(n for n in names if n.endswith(f"/{MANIFEST_NAME}"))
    assert manifests[-1] == f"{RUN}/step-{STEPS:08d}/{MANIFEST_NAME}", manifests
    # The status names a checkpoint of this run; it can be one step behind the last, which the
    # learner writes just before it exits (the operator's last progress poll may precede it).
    assert cluster_run.final["lastCheckpoint"] in {
        f"s3://{cluster_run.bucket}/{RUN}/step-{step:08d}" for step in (STEPS - 1, STEPS)}, cluster_run.final
    # learner-1 sees no directory of learner-0's: its shards and RNG state are in S3 because it
    # uploaded them, and the one manifest names them.
    manifest = s3.client().get_object(cluster_run.bucket, manifests[-1]).read()
    files = {f["path"] for f in json.loads(manifest)["files"]}
    assert {"deepspeed/rng_state_rank1.pt", "rng_state.pt"} <= files
    assert any("zero_pp_rank_1_" in f for f in files), sorted(files)


def test_metrics_land_in_mlflow_and_no_trajectory_is_counted_twice(cluster_run: ClusterRun) -> None:
    import httpx

    cluster = cluster_run.cluster
    runs = cluster.mlflow_runs("cluster-e2e")
    assert runs
    run_id = cluster_run.final["mlflowRunId"]
    assert run_id in {r["info"]["run_id"] for r in runs}
    history = httpx.get(f"{cluster.mlflow_uri}/api/2.0/mlflow/metrics/get-history",
                        params={"run_id": run_id, "metric_key": "rollout/trajectories"}, timeout=10).json()
    by_step: dict[int, float] = {}
    for metric in history.get("metrics", []):
        by_step[int(metric["step"])] = float(metric["value"])  # a resumed step overwrites, never adds
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert set(by_step.values()) == {float(GROUP_SIZE * QUESTIONS)}


def test_status_comes_from_the_run_and_kubectl_shows_it(cluster_run: ClusterRun) -> None:
    final = cluster_run.final
    assert final.get("mlflowRunId")
    assert final.get("lastCheckpoint")
    assert "reward" in final and "heldOutAccuracy" in final
    header = cluster_run.get_output.splitlines()[0].split()
    row = next(line.split() for line in cluster_run.get_output.splitlines()[1:] if line.startswith(RUN))
    assert header[0] == "NAME" and "PHASE" in header and "STEP" in header
    assert row[header.index("PHASE")] == "Succeeded"
    assert row[header.index("STEP")] in (str(STEPS), f"{STEPS}/{STEPS}")


@pytest.fixture  # one test's: its gateway goes before the module's next run starts
def served(cluster_run: ClusterRun) -> Iterator[str]:
    cluster = cluster_run.cluster
    service = {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowService", "metadata": {"name": "math-agent"},
               "spec": {"model": {"flowRun": {"name": RUN, "checkpoint": "latest"}}, "tools": [{"name": "python"}],
                        "agent": {"maxTurns": 2},
                        "resources": {"cpu": "2", "memory": "6Gi"}}}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(service))
    deadline = time.monotonic() + 900
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = cluster.get("flowservice", "math-agent").get("status") or {}
        if status.get("phase") == "Ready":
            break
        time.sleep(3)
    else:
        pods = cluster.kubectl("get", "pods", "-o", "json").stdout
        raise AssertionError(f"FlowService not Ready: {status}\n{pods[-3000:]}\n{cluster.operator_logs(60)}")
    pods = json.loads(cluster.kubectl("get", "pods", "-l", "flowlane.dev/flowservice=math-agent", "-o",
                                      "json").stdout)["items"]
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("phase") == "Running")
    # The node agent runs no probes: wait for what the pod's readinessProbe checks (the model loaded).
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{ip}:8000/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(3)
    try:
        yield f"http://{ip}:8000/v1"
    finally:
        remove_flowservice(cluster, "math-agent")


def remove_flowservice(cluster: OneMachineCluster, name: str) -> None:
    """Delete the FlowService and, in the garbage collector's place (the emulator has none), the
    Deployment and pods it owns; return once the gateway's container is gone. Its engine holds some
    4 GiB, which the later runs of this module need on a 24 GiB machine."""
    selector = f"flowlane.dev/flowservice={name}"
    cluster.kubectl("delete", "flowservice", name, "--wait=false")
    cluster.kubectl("delete", "deployment", "-l", selector, "--wait=false")
    cluster.kubectl("delete", "pod", "-l", selector, "--wait=false")
    prefix = f"k8s_{cluster.namespace}_{name}-gateway-"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pods = json.loads(cluster.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)["items"]
        running = [c for c in podman("ps", "--format", "{{.Names}}", check=False).stdout.split()
                   if c.startswith(prefix)]
        if not pods and not running:
            return
        time.sleep(2)
    raise AssertionError(f"the FlowService {name} outlived its deletion: {pods} {running}")


def test_a_flowservice_serves_the_latest_checkpoint_to_the_openai_client(served: str) -> None:
    import openai

    client = openai.OpenAI(base_url=served, api_key="unused", timeout=300)
    models = [m.id for m in client.models.list().data]
    assert models == ["math-agent"]
    reply = client.chat.completions.create(model="math-agent", messages=[{"role": "user", "content": "What is 2+3?"}])
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


def flowrun_with_sandbox_image(cluster: OneMachineCluster, name: str, image: str) -> dict[str, Any]:
    assert cluster.s3 is not None
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": name},
            "spec": {"tools": [{"name": "python"}], "tasks": {"dataset": "arithmetic"},
                     "schedule": {"steps": 1, "checkpointInterval": 1, "evalInterval": 0},
                     "storage": {"checkpointUri": f"s3://{cluster.s3.make_bucket(name)}/{name}",
                                 "s3Endpoint": cluster.s3.url, "credentialsSecret": {"name": "s3-credentials"}},
                     "sandbox": {"resources": {"image": image}}}}


def test_a_missing_image_shows_in_status_as_image_pull_backoff(cluster: OneMachineCluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        flowrun_with_sandbox_image(cluster, "no-image", "ghcr.io/flowlane/flowlane-sandbox:does-not-exist")))
    try:
        status = wait_status(cluster, "no-image", lambda s: "ImagePullBackOff" in str(s.get("message", "")), 240)
        assert status["phase"] == "Pending"
        assert "no-image-sandbox-0" in status["message"]
        events = cluster.kubectl("get", "events", "-o", "json").stdout
        assert "ImagePullBackOff" in events
    finally:
        cluster.kubectl("delete", "flowrun", "no-image", "--wait=false")


def test_a_pod_whose_command_fails_shows_crash_loop_backoff_with_its_last_log_line(
        cluster: OneMachineCluster) -> None:
    # The operator image has the CLI but not the sandbox's parts: `flowlane sandbox` exits at start.
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        flowrun_with_sandbox_image(cluster, "bad-command", IMAGES["operator"])))
    try:
        status = wait_status(cluster, "bad-command", lambda s: "CrashLoopBackOff" in str(s.get("message", "")), 300)
        assert status["phase"] != "Running"
        last_line = cluster.pod_logs("bad-command-sandbox-0", 5).strip().splitlines()[-1]
        assert last_line in status["message"]
    finally:
        cluster.kubectl("delete", "flowrun", "bad-command", "--wait=false")


def wait_status(cluster: OneMachineCluster, name: str, predicate: Callable[[dict[str, Any]], bool],
                timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = cluster.get("flowrun", name).get("status") or {}
        if predicate(status):
            return status
        time.sleep(2)
    raise AssertionError(f"{name}: timed out; status {status}")


def test_every_image_carries_exactly_its_component(built_images: None) -> None:
    def has(image: str, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('{module}') else 1)"
        return podman("run", "--rm", "--entrypoint", "python", image, "-c", code, check=False).returncode == 0

    assert not has(IMAGES["operator"], "torch") and has(IMAGES["operator"], "kopf")
    assert not has(IMAGES["sandbox"], "pip") and not has(IMAGES["sandbox"], "torch")
    assert has(IMAGES["learner"], "deepspeed") and not has(IMAGES["learner"], "vllm")
    assert has(IMAGES["rollout"], "vllm") and not has(IMAGES["rollout"], "deepspeed")
    assert has(IMAGES["gateway"], "uvicorn") and has(IMAGES["gateway"], "vllm")
