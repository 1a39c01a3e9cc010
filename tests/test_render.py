"""The process graph and its Kubernetes rendering: commands, addresses, security, schema validity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowlane.api.flowrun import Dtype, FlowRun, ModelVolume, load_flowrun
from flowlane.api.flowservice import load_flowservice
from flowlane.operator.graph import POD_CONFIG_PATH, Role, SecretEnv, compile_graph, resolve
from flowlane.operator.local_plan import dependency_levels
from flowlane.operator.render import (
    ANNOTATION_CHECKPOINT,
    ANNOTATION_HASH,
    LABEL_EPOCH,
    RenderOptions,
    render_flowrun,
    render_token_secret,
)
from flowlane.operator.render_service import render_flowservice, s3_env

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = kubernetes_validate.latest_version()


def flowrun(spec: str = "{}", name: str = "demo") -> FlowRun:
    return load_flowrun(f"apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\n"
                        f"metadata: {{name: {name}, namespace: ml, uid: uid-1}}\nspec: {spec}\n")


TWO_BY_TWO = ("{rollout: {replicas: 2, resources: {gpu: 1, nodeSelector: {pool: gpu}, tolerations: "
              "[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}}, sandbox: {replicas: 2}, "
              "storage: {checkpointUri: 's3://b/demo', s3Endpoint: 'http://minio:9000', "
              "credentialsSecret: {name: s3}}, tracking: {mlflowUri: 'http://mlflow:5000'}}")


def by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


# -- the graph ------------------------------------------------------------------------------------


def test_graph_has_one_learner_and_the_requested_workers_and_sandboxes() -> None:
    graph = compile_graph(flowrun(TWO_BY_TWO))
    assert [(c.name, c.role) for c in graph.components] == [
        ("learner", Role.LEARNER), ("sandbox-0", Role.SANDBOX), ("sandbox-1", Role.SANDBOX),
        ("rollout-0", Role.ROLLOUT), ("rollout-1", Role.ROLLOUT)]
    assert dependency_levels(graph.components) == [["learner", "sandbox-0", "sandbox-1"], ["rollout-0", "rollout-1"]]


def test_component_commands_are_flowlane_cli_entry_points_with_abstract_addresses() -> None:
    graph = compile_graph(flowrun(TWO_BY_TWO), config_path="/runs/demo/run.yaml")
    assert graph.component("learner").argv == (
        "flowlane", "learner", "--config", "/runs/demo/run.yaml", "--port", "{port:learner.grpc}")
    assert graph.component("sandbox-1").argv == (
        "flowlane", "sandbox", "--config", "/runs/demo/run.yaml", "--port", "{port:sandbox-1.grpc}")
    assert graph.component("rollout-0").argv == (
        "flowlane", "rollout", "--config", "/runs/demo/run.yaml", "--learner", "{address:learner.grpc}",
        "--sandbox", "{address:sandbox-0.grpc}", "--sandbox", "{address:sandbox-1.grpc}")
    assert graph.component("rollout-1").depends_on == ("learner", "sandbox-0", "sandbox-1")


def test_placeholders_resolve_with_the_backend_lookups() -> None:
    ports = {("learner", "grpc"): 41001, ("sandbox-0", "grpc"): 41002}
    text = "--learner {address:learner.grpc} --port {port:sandbox-0.grpc}"
    assert resolve(text, lambda c, p: f"127.0.0.1:{ports[c, p]}", lambda c, p: ports[c, p]) == (
        "--learner 127.0.0.1:41001 --port 41002")


def test_every_component_gets_the_token_and_only_the_learner_gets_storage_and_tracking() -> None:
    graph = compile_graph(flowrun(TWO_BY_TWO))
    token = SecretEnv("demo-grpc-token", "token")
    assert graph.token == token and graph.token_generated
    for component in graph.components:
        assert component.secret_env["FLOWLANE_GRPC_TOKEN"] == token
    learner = graph.component("learner")
    assert learner.secret_env["AWS_ACCESS_KEY_ID"] == SecretEnv("s3", "accessKey")
    assert learner.env["FLOWLANE_S3_ENDPOINT"] == "http://minio:9000"
    assert learner.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert set(graph.component("sandbox-0").secret_env) == {"FLOWLANE_GRPC_TOKEN"}
    assert "AWS_ACCESS_KEY_ID" not in graph.component("rollout-0").secret_env


def test_a_named_token_secret_is_used_instead_of_a_generated_one() -> None:
    graph = compile_graph(flowrun("{grpcAuth: {name: shared, key: t}}"))
    assert graph.token == SecretEnv("shared", "t") and not graph.token_generated


def test_run_config_leaves_out_placement_only_fields() -> None:
    graph = compile_graph(flowrun("{suspend: true, backoffLimit: 7, activeDeadlineSeconds: 60}"))
    assert not {"suspend", "backoffLimit", "activeDeadlineSeconds"} & set(graph.config["spec"])
    assert graph.config["metadata"] == {"name": "demo", "namespace": "ml"}
    assert load_flowrun(yaml.safe_dump(graph.config)).spec.algorithm == flowrun().spec.algorithm


# -- Kubernetes objects ---------------------------------------------------------------------------


def all_objects(run: FlowRun) -> list[dict[str, Any]]:
    rendered = render_flowrun(run, epoch=0)
    return [*rendered.static_children(), *rendered.pods, render_token_secret(run, "secret")]


@pytest.mark.parametrize("spec", ["{}", TWO_BY_TWO, "{storage: {checkpointUri: 'file:///ckpt', volumeClaimName: c}}",
                                  "{learner: {replicas: 2, ranks: 2}}"])
def test_every_rendered_flowrun_object_validates_against_kubernetes(spec: str) -> None:
    for obj in all_objects(flowrun(spec)):
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_cluster_example_renders_valid_objects() -> None:
    for obj in all_objects(load_flowrun(REPO / "examples" / "flowrun-cluster.yaml")):
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_rendered_flowservice_objects_validate_against_kubernetes() -> None:
    fsvc = load_flowservice(REPO / "examples" / "flowservice.yaml")
    rendered = render_flowservice(fsvc, checkpoint="s3://b/ckpt/step-40",
                                  storage_env=s3_env("http://minio:9000", flowrun(TWO_BY_TWO).spec.storage
                                                     .credentials_secret))
    for obj in rendered.children():
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_children_have_deterministic_names_and_owner_references() -> None:
    objs = all_objects(flowrun(TWO_BY_TWO))
    assert sorted(o["metadata"]["name"] for o in objs) == [
        "demo-config", "demo-grpc-token", "demo-learner", "demo-learner", "demo-pdb", "demo-rollout-0",
        "demo-rollout-1",
        "demo-sandbox-0", "demo-sandbox-0", "demo-sandbox-1", "demo-sandbox-1", "demo-sandbox-policy"]
    for obj in objs:
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "name": "demo", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True}]
        assert obj["metadata"]["labels"]["flowlane.dev/flowrun"] == "demo"


def test_pods_reach_each_other_through_headless_services() -> None:
    rendered = render_flowrun(flowrun(TWO_BY_TWO), epoch=0)
    services = by_name(rendered.services)
    assert services["demo-learner"]["spec"]["clusterIP"] == "None"
    assert services["demo-learner"]["spec"]["selector"] == {
        "flowlane.dev/flowrun": "demo", "flowlane.dev/component": "learner"}
    pods = by_name(rendered.pods)
    assert pods["demo-rollout-1"]["spec"]["containers"][0]["command"] == [
        "flowlane", "rollout", "--config", POD_CONFIG_PATH, "--learner", "demo-learner.ml.svc:50051",
        "--sandbox", "demo-sandbox-0.ml.svc:50052", "--sandbox", "demo-sandbox-1.ml.svc:50052"]
    # servers listen on every interface of their pod, not on the graph's loopback default
    assert pods["demo-learner"]["spec"]["containers"][0]["command"] == [
        "flowlane", "learner", "--config", POD_CONFIG_PATH, "--port", "50051", "--host", "0.0.0.0"]
    assert pods["demo-sandbox-1"]["spec"]["containers"][0]["command"][-4:] == ["--port", "50052", "--host", "0.0.0.0"]


def test_a_learner_pod_with_several_gpus_runs_one_rank_per_gpu_under_torchrun() -> None:
    pods = by_name(render_flowrun(flowrun("{learner: {resources: {gpu: 4}}}"), epoch=0).pods)
    container = pods["demo-learner"]["spec"]["containers"][0]
    assert container["command"] == [
        "torchrun", "--standalone", "--nproc-per-node=4", "--max-restarts=0", "-m", "flowlane.cli",
        "learner", "--config", POD_CONFIG_PATH, "--port", "50051", "--host", "0.0.0.0"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


TWO_LEARNER_PODS = ("{learner: {replicas: 2, resources: {gpu: 4}}, storage: {checkpointUri: 's3://b/demo', "
                    "s3Endpoint: 'http://minio:9000', credentialsSecret: {name: s3}}}")
LEARNER_0_DNS = "demo-learner-0.demo-learner.ml.svc"


def test_several_learner_pods_are_one_group_of_indexed_components_and_only_the_first_serves() -> None:
    graph = compile_graph(flowrun(TWO_LEARNER_PODS), config_path="/run.yaml")
    learners = graph.by_role(Role.LEARNER)
    assert [(c.name, c.index, c.group, c.ready_port) for c in learners] == [
        ("learner-0", 0, "learner", "grpc"), ("learner-1", 1, "learner", None)]
    assert [p.name for p in learners[0].ports] == ["grpc", "rendezvous"]
    assert learners[1].ports == ()
    assert graph.lead_learner == "learner-0"
    assert graph.component("rollout-0").depends_on == ("learner-0", "sandbox-0")
    assert graph.component("rollout-0").argv[5] == "{address:learner-0.grpc}"
    assert dependency_levels(graph.components) == [["learner-0", "learner-1", "sandbox-0"], ["rollout-0"]]


def test_each_learner_pod_is_a_torchrun_node_meeting_at_the_first_pods_rendezvous_port() -> None:
    graph = compile_graph(flowrun(TWO_LEARNER_PODS), config_path="/run.yaml")
    assert graph.component("learner-1").argv == (
        "torchrun", "--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--master-addr={host:learner-0.rendezvous}",
        "--master-port={port:learner-0.rendezvous}", "--max-restarts=0", "-m", "flowlane.cli",
        "learner", "--config", "/run.yaml", "--port", "{port:learner-0.grpc}")
    assert graph.component("learner-0").argv[1:3] == ("--nnodes=2", "--node-rank=0")
    # Every pod uploads its own shards: each gets the storage keys, not only the first.
    for name in ("learner-0", "learner-1"):
        assert set(graph.component(name).secret_env) == {"FLOWLANE_GRPC_TOKEN", "AWS_ACCESS_KEY_ID",
                                                         "AWS_SECRET_ACCESS_KEY"}
        assert graph.component(name).env["FLOWLANE_S3_ENDPOINT"] == "http://minio:9000"


def test_a_host_placeholder_is_the_address_without_its_port() -> None:
    text = "--master-addr={host:learner-0.rendezvous} --master-port={port:learner-0.rendezvous}"
    assert resolve(text, lambda c, p: f"{c}.svc:29500", lambda c, p: 29500) == (
        "--master-addr=learner-0.svc --master-port=29500")


def test_learner_pods_get_stable_dns_names_from_one_headless_service_that_publishes_unready_pods() -> None:
    rendered = render_flowrun(flowrun(TWO_LEARNER_PODS), epoch=0)
    group = by_name(rendered.services)["demo-learner"]
    assert group["spec"] == {
        "clusterIP": "None",
        "selector": {"flowlane.dev/flowrun": "demo", "flowlane.dev/group": "learner"},
        "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051, "protocol": "TCP", "appProtocol": "grpc"},
                  {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}],
        "publishNotReadyAddresses": True,
    }
    assert sorted(by_name(rendered.services)) == ["demo-learner", "demo-sandbox-0"]  # no per-pod learner Service
    pods = by_name(rendered.pods)
    for index in (0, 1):
        pod = pods[f"demo-learner-{index}"]
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == (f"demo-learner-{index}", "demo-learner")
        assert pod["metadata"]["labels"]["flowlane.dev/group"] == "learner"
        assert pod["metadata"]["labels"]["flowlane.dev/component"] == f"learner-{index}"
        assert pod["spec"]["restartPolicy"] == "Never"  # a failed rank restarts the group, not itself
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pods["demo-learner-0"]["spec"]["containers"][0]["command"] == [
        "torchrun", "--nnodes=2", "--node-rank=0", "--nproc-per-node=4", f"--master-addr={LEARNER_0_DNS}",
        "--master-port=29500", "--max-restarts=0", "-m", "flowlane.cli", "learner", "--config", POD_CONFIG_PATH,
        "--port", "50051", "--host", "0.0.0.0"]
    assert pods["demo-learner-0"]["spec"]["containers"][0]["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]
    assert pods["demo-learner-0"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    follower = pods["demo-learner-1"]["spec"]["containers"][0]
    assert "ports" not in follower and "readinessProbe" not in follower
    assert follower["command"][4] == f"--master-addr={LEARNER_0_DNS}"
    assert pods["demo-rollout-0"]["spec"]["containers"][0]["command"][5] == f"{LEARNER_0_DNS}:50051"


def test_every_learner_pod_is_in_the_disruption_budget_and_the_kueue_group() -> None:
    run = flowrun("{learner: {replicas: 3}, podTemplate: {labels: {kueue.x-k8s.io/queue-name: q}}}")
    rendered = render_flowrun(run, epoch=2)
    learners = [p for p in rendered.pods if p["metadata"]["labels"]["flowlane.dev/role"] == "learner"]
    assert [p["metadata"]["name"] for p in learners] == ["demo-learner-0", "demo-learner-1", "demo-learner-2"]
    for pod in learners:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "demo-2"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "5"
        assert pod["metadata"]["labels"]["flowlane.dev/epoch"] == "2"
    expression = rendered.disruption_budget["spec"]["selector"]["matchExpressions"][0]
    assert expression == {"key": "flowlane.dev/role", "operator": "In", "values": ["learner", "rollout"]}


def test_secrets_reach_pods_only_as_secret_key_refs() -> None:
    pods = by_name(render_flowrun(flowrun(TWO_BY_TWO), epoch=0).pods)
    env = env_of(pods["demo-learner"])
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "secretKey"}}
    assert env["FLOWLANE_GRPC_TOKEN"] == {"secretKeyRef": {"name": "demo-grpc-token", "key": "token"}}


def test_gpus_node_selectors_and_tolerations_come_from_the_spec() -> None:
    pods = by_name(render_flowrun(flowrun(TWO_BY_TWO), epoch=0, options=RenderOptions(
        gpu_resource_name="nvidia.com/gpu")).pods)
    rollout = pods["demo-rollout-0"]
    assert rollout["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "1", "memory": "6Gi", "nvidia.com/gpu": 1}
    assert rollout["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert rollout["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nvidia.com/gpu" not in pods["demo-learner"]["spec"]["containers"][0]["resources"]["limits"]


def test_sandbox_pods_are_locked_down() -> None:
    pod = by_name(render_flowrun(flowrun(), epoch=0).pods)["demo-sandbox-0"]
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "fsGroup": 10001,
                                              "fsGroupChangePolicy": "OnRootMismatch",
                                              "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["spec"]["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
        "readOnlyRootFilesystem": True}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_sandbox_network_policy_admits_only_rollout_workers_and_allows_no_egress() -> None:
    policy = render_flowrun(flowrun(), epoch=0).network_policy
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"flowlane.dev/flowrun": "demo", "flowlane.dev/role": "sandbox"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"flowlane.dev/flowrun": "demo",
                                                               "flowlane.dev/role": "rollout"}}}],
                     "ports": [{"protocol": "TCP", "port": 50052}]}],
        "egress": [],
    }


def test_config_map_holds_the_run_config_components_read() -> None:
    run = flowrun(TWO_BY_TWO)
    config_map = render_flowrun(run, epoch=0).config_map
    assert load_flowrun(config_map["data"]["run.yaml"]).spec == run.spec.model_copy(update={"suspend": False})


def test_only_stateless_sandboxes_are_restarted_by_the_kubelet() -> None:
    pods = by_name(render_flowrun(flowrun(), epoch=0).pods)
    assert {name: pod["spec"]["restartPolicy"] for name, pod in pods.items()} == {
        "demo-learner": "Never", "demo-rollout-0": "Never", "demo-sandbox-0": "Always"}


def test_pod_hash_ignores_placement_only_fields_and_follows_the_rest() -> None:
    def hashes(spec: str, epoch: int = 0) -> dict[str, str]:
        return {p["metadata"]["name"]: p["metadata"]["annotations"][ANNOTATION_HASH]
                for p in render_flowrun(flowrun(spec), epoch=epoch).pods}

    base = hashes("{}")
    assert hashes("{}") == base
    assert hashes("{suspend: true, backoffLimit: 9, ttlSecondsAfterFinished: 5}") == base
    assert hashes("{}", epoch=3) == base
    assert all(base[n] != h for n, h in hashes("{algorithm: {lr: 0.001}}").items())


def test_epoch_label_records_the_restart_count() -> None:
    pods = render_flowrun(flowrun(), epoch=2).pods
    assert {p["metadata"]["labels"][LABEL_EPOCH] for p in pods} == {"2"}


def test_flowservice_deployment_rolls_without_downtime_to_the_checkpoint() -> None:
    fsvc = load_flowservice(REPO / "examples" / "flowservice.yaml")
    first = render_flowservice(fsvc, checkpoint="s3://b/step-10").deployment
    second = render_flowservice(fsvc, checkpoint="s3://b/step-20").deployment
    assert first["spec"]["strategy"] == {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    template = second["spec"]["template"]
    assert template["metadata"]["annotations"][ANNOTATION_CHECKPOINT] == "s3://b/step-20"
    assert template["spec"]["containers"][0]["command"] == [
        "flowlane", "serve", "--model", "s3://b/step-20", "--dtype", "auto", "--served-model-name", "math-agent",
        "--engine", "vllm", "--max-model-len", "4096",
        "--tools", "python,generator", "--host", "0.0.0.0", "--port", "8000", "--max-turns", "10",
        "--min-turns", "1", "--max-time-s", "120", "--max-concurrent-runs", "16", "--history-max-tokens", "1024"]
    assert first["metadata"]["annotations"][ANNOTATION_HASH] != second["metadata"]["annotations"][ANNOTATION_HASH]
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    assert env["FLOWLANE_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "agent-api", "key": "token"}}


def test_flowservice_fixed_model_and_dtype_reach_the_gateway_command_flowlane_serve_parses() -> None:
    import typer

    from flowlane.runtime.serving.gateway import serve

    fsvc = load_flowservice(REPO / "examples" / "flowservice.yaml")
    fsvc.spec.model.fixed, fsvc.spec.model.dtype = "smollm2-135m-instruct", Dtype.BFLOAT16
    argv = render_flowservice(fsvc, checkpoint="s3://b/step-20").deployment[
        "spec"]["template"]["spec"]["containers"][0]["command"]
    app = typer.Typer()
    app.command()(serve)
    params = typer.main.get_command(app).make_context("serve", list(argv[2:])).params
    assert (params["model"], params["fixed"], params["dtype"]) == ("s3://b/step-20", "smollm2-135m-instruct",
                                                                   "bfloat16")
    assert (params["served_model_name"], params["port"], params["max_concurrent_runs"]) == ("math-agent", 8000, 16)


@pytest.mark.parametrize(("min_turns", "max_turns", "trained", "served"), [
    (None, 10, None, 1),  # neither says: the verifier is asked after every turn
    (None, 10, 2, 2),  # a planner trained with minTurns 2 is served as it was trained
    (3, 10, 2, 3),  # the FlowService's own value wins
    (None, 2, 4, 2),  # never above the service's turn budget
])
def test_the_gateway_turn_floor_comes_from_the_flowservice_else_the_flowrun_it_serves(
        min_turns: int | None, max_turns: int, trained: int | None, served: int) -> None:
    import typer

    from flowlane.runtime.serving.gateway import serve

    fsvc = load_flowservice(REPO / "examples" / "flowservice.yaml")
    fsvc.spec.agent.min_turns, fsvc.spec.agent.max_turns = min_turns, max_turns
    argv = render_flowservice(fsvc, checkpoint="s3://b/step-20", trained_min_turns=trained).deployment[
        "spec"]["template"]["spec"]["containers"][0]["command"]
    app = typer.Typer()
    app.command()(serve)
    params = typer.main.get_command(app).make_context("serve", list(argv[2:])).params
    assert (params["min_turns"], params["max_turns"]) == (served, max_turns)


def test_image_pull_secrets_reach_every_flowrun_pod_and_the_gateway() -> None:
    options = RenderOptions(image_pull_secrets=("regcred", "mirror"))
    pods = render_flowrun(flowrun(), epoch=0, options=options).pods
    assert {json.dumps(p["spec"]["imagePullSecrets"]) for p in pods} == {
        json.dumps([{"name": "regcred"}, {"name": "mirror"}])}
    assert "imagePullSecrets" not in render_flowrun(flowrun(), epoch=0).pods[0]["spec"]


def test_a_model_volume_is_mounted_read_only_in_learner_and_rollout_pods_only() -> None:
    run = flowrun()
    run = run.model_copy(update={"spec": run.spec.model_copy(update={"model": run.spec.model.model_copy(
        update={"planner": "/models/tiny", "volume": ModelVolume(claim_name="weights")})})})
    pods = by_name(render_flowrun(run, epoch=0).pods)
    for name in ("demo-learner", "demo-rollout-0"):
        spec = pods[name]["spec"]
        claim = {"claimName": "weights", "readOnly": True}
        assert {"name": "models", "persistentVolumeClaim": claim} in spec["volumes"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    assert all(v["name"] != "models" for v in pods["demo-sandbox-0"]["spec"]["volumes"])


def test_engine_pods_get_a_memory_backed_dev_shm_larger_than_the_64_mib_default() -> None:
    pods = by_name(render_flowrun(flowrun(), epoch=0).pods)
    for name in ("demo-learner", "demo-rollout-0"):
        spec = pods[name]["spec"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in spec["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    assert all(v["name"] != "dshm" for v in pods["demo-sandbox-0"]["spec"]["volumes"])
