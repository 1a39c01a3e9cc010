"""spec.podTemplate reaches every pod kind (learner, rollout, sandbox, FlowService gateway), and every
FlowRun gets a PodDisruptionBudget for its group: rendered objects checked field by field and
against the real Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from flowlane.api.errors import ConfigError
from flowlane.api.flowrun import load_flowrun
from flowlane.api.flowservice import load_flowservice
from flowlane.operator.render import ANNOTATION_HASH, RenderOptions, render_flowrun
from flowlane.operator.render_service import render_flowservice

KUBERNETES = kubernetes_validate.latest_version()
TEMPLATE = ("{labels: {kueue.x-k8s.io/queue-name: team-a, cost-centre: ml-42}, "
            "annotations: {example.com/owner: 'ana@example.com'}, priorityClassName: training-high, "
            "schedulerName: volcano, serviceAccountName: trainer, imagePullSecrets: [team-registry]}")
OPTIONS = RenderOptions(image_pull_secrets=("cluster-registry",))


def flowrun_pods(template: str = TEMPLATE) -> list[dict[str, Any]]:
    run = load_flowrun("apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo, namespace: ml, "
                       f"uid: u1}}\nspec: {{storage: {{checkpointUri: 's3://b/demo'}}, podTemplate: {template}}}\n")
    return render_flowrun(run, epoch=0, options=OPTIONS).pods


def gateway_pod_template(template: str = TEMPLATE) -> dict[str, Any]:
    fsvc = load_flowservice("apiVersion: flowlane.dev/v1alpha1\nkind: FlowService\nmetadata: {name: agent, "
                            "namespace: ml, uid: u2}\n"
                            f"spec: {{model: {{uri: 's3://b/ckpt'}}, podTemplate: {template}}}\n")
    deployment = render_flowservice(fsvc, checkpoint="s3://b/ckpt", options=OPTIONS).deployment
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    template_obj: dict[str, Any] = deployment["spec"]["template"]
    return template_obj


def every_pod_kind() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind, metadata, spec) of a learner, a rollout worker, a sandbox and a gateway pod."""
    pods = {p["metadata"]["labels"]["flowlane.dev/role"]: p for p in flowrun_pods()}
    gateway = gateway_pod_template()
    return [*((role, pods[role]["metadata"], pods[role]["spec"]) for role in ("learner", "rollout", "sandbox")),
            ("gateway", gateway["metadata"], gateway["spec"])]


@pytest.mark.parametrize("kind", ["learner", "rollout", "sandbox", "gateway"])
def test_every_pass_through_field_reaches_every_pod_kind(kind: str) -> None:
    meta, spec = next((m, s) for k, m, s in every_pod_kind() if k == kind)
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["labels"]["cost-centre"] == "ml-42"
    assert meta["annotations"]["example.com/owner"] == "ana@example.com"
    assert spec["priorityClassName"] == "training-high"
    assert spec["schedulerName"] == "volcano"
    assert spec["serviceAccountName"] == "trainer"
    assert spec["imagePullSecrets"] == [{"name": "cluster-registry"}, {"name": "team-registry"}]
    assert spec["automountServiceAccountToken"] is False  # a service account still gets no API token


def test_pods_with_a_pod_template_validate_against_kubernetes() -> None:
    for pod in flowrun_pods():
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_without_a_pod_template_pods_carry_only_the_operators_fields() -> None:
    pod = flowrun_pods("{}")[0]
    assert not {"priorityClassName", "schedulerName", "serviceAccountName"} & set(pod["spec"])
    assert pod["spec"]["imagePullSecrets"] == [{"name": "cluster-registry"}]
    assert set(pod["metadata"]["annotations"]) == {ANNOTATION_HASH}


def test_a_pod_template_change_rolls_the_pods() -> None:
    hashes = [[p["metadata"]["annotations"][ANNOTATION_HASH] for p in flowrun_pods(t)]
              for t in ("{}", "{annotations: {a: b}}", "{labels: {a: b}}", "{priorityClassName: p}")]
    for i, before in enumerate(hashes):
        for after in hashes[i + 1:]:
            assert all(x != y for x, y in zip(before, after, strict=True))


@pytest.mark.parametrize(("template", "error"), [
    ("{labels: {flowlane.dev/role: x}}", "spec.podTemplate.labels.flowlane.dev/role: label keys under flowlane.dev/"),
    ("{labels: {app.kubernetes.io/name: x}}", "spec.podTemplate.labels.app.kubernetes.io/name: label keys under"),
    ("{annotations: {flowlane.dev/spec-hash: x}}", "spec.podTemplate.annotations.flowlane.dev/spec-hash: annotation"),
    ("{labels: {'bad key!': x}}", "spec.podTemplate.labels.bad key!: not a label or annotation key"),
    ("{labels: {team: 'not a value'}}", "spec.podTemplate.labels.team: a label value is at most 63"),
    ("{priorityClassName: High}", "spec.podTemplate.priorityClassName: must be a DNS subdomain name"),
])
def test_a_bad_pod_template_is_refused_with_its_field_path(template: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        flowrun_pods(template)
    assert error in str(exc.value)


def test_the_operators_labels_win_over_the_templates() -> None:
    pods = flowrun_pods("{labels: {team: a}}")
    assert all(p["metadata"]["labels"]["flowlane.dev/flowrun"] == "demo" for p in pods)


def test_every_run_gets_a_disruption_budget_for_its_learner_and_rollout_pods() -> None:
    run = load_flowrun("apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo, namespace: ml, "
                       "uid: u1}\nspec: {storage: {checkpointUri: 's3://b/demo'}}\n")
    budget = render_flowrun(run, epoch=0).disruption_budget
    kubernetes_validate.validate(budget, KUBERNETES, strict=True)
    assert budget["metadata"]["name"] == "demo-pdb"
    assert budget["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert budget["spec"] == {"maxUnavailable": 0, "selector": {
        "matchLabels": {"flowlane.dev/flowrun": "demo"},
        "matchExpressions": [{"key": "flowlane.dev/role", "operator": "In", "values": ["learner", "rollout"]}]}}


def test_a_queued_run_forms_one_kueue_pod_group_per_epoch() -> None:
    pods = flowrun_pods("{labels: {kueue.x-k8s.io/queue-name: team-a}}")
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in pods} == {"demo-0"}
    assert {p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for p in pods} == {"3"}
    assert all(p["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" for p in pods)
    run = load_flowrun("apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo, namespace: ml}\n"
                       "spec: {storage: {checkpointUri: 's3://b/demo'}, podTemplate: {labels: "
                       "{kueue.x-k8s.io/queue-name: team-a}}}\n")
    restarted = render_flowrun(run, epoch=2).pods
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in restarted} == {"demo-2"}


def test_without_a_queue_pods_carry_no_kueue_group() -> None:
    pod = flowrun_pods("{labels: {team: a}}")[0]
    assert not [k for k in (*pod["metadata"]["labels"], *pod["metadata"]["annotations"]) if k.startswith("kueue.")]
