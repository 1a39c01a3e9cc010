"""The real kubectl against the KMock API emulator: what an operator's user types works here too.

Most tests run kubectl on the session's emulator in the test's own namespace (the ``kubectl``
fixture); the CRDs, which are cluster-scoped, are applied there once. Tests that need a cluster
nobody else touched (``created`` rather than ``unchanged``, a CRD that comes and goes) start
an emulator of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_kube import (
    EVENTS,
    FLOWRUNS,
    PODS,
    KMockServer,
    KubeApi,
    Kubectl,
    find_kubectl,
    human_duration,
    write_kubeconfig,
)

ROOT = Path(__file__).resolve().parent.parent
CRD_FILES = [str(ROOT / "crds" / "flowruns.flowlane.dev.yaml"), str(ROOT / "crds" / "flowservices.flowlane.dev.yaml")]
EXAMPLE = ROOT / "examples" / "flowrun.yaml"
AGE = re.compile(r"\d+s")

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Widget, listKind: WidgetList, plural: widgets, singular: widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
"""


@pytest.fixture
def own_kubectl(tmp_path: Path) -> Iterator[Kubectl]:
    """kubectl on an emulator of its own, namespace ``own``."""
    binary = find_kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed")
    server = KMockServer().start()
    yield Kubectl(write_kubeconfig(tmp_path / "kubeconfig", server.url, "own"), tmp_path / "cache", binary)
    server.stop()


@pytest.fixture
def crds(kmock_server: KMockServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The flowlane CRDs applied to the session's emulator (idempotent: cluster-scoped, shared)."""
    binary = find_kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed")
    home = tmp_path_factory.mktemp("crds")
    Kubectl(write_kubeconfig(home / "kubeconfig", kmock_server.url, "default"), home / "cache", binary)(
        "apply", *[arg for path in CRD_FILES for arg in ("-f", path)])


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


def edited_example(**replacements: str) -> str:
    text = EXAMPLE.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_apply_crds_creates_them_and_get_crd_lists_them(own_kubectl: Kubectl) -> None:
    applied = own_kubectl("apply", "-f", CRD_FILES[0], "-f", CRD_FILES[1])
    assert applied.stdout == ("customresourcedefinition.apiextensions.k8s.io/flowruns.flowlane.dev created\n"
                              "customresourcedefinition.apiextensions.k8s.io/flowservices.flowlane.dev created\n")
    listed = rows(own_kubectl("get", "crd").stdout)
    assert listed[0] == ["NAME", "CREATED", "AT"]
    assert [row[0] for row in listed[1:]] == ["flowruns.flowlane.dev", "flowservices.flowlane.dev"]
    assert own_kubectl("get", "crd", "flowruns.flowlane.dev", "-o", "jsonpath={.spec.names.kind}").stdout == "FlowRun"


def test_reapplying_the_crds_changes_nothing(own_kubectl: Kubectl) -> None:
    own_kubectl("apply", "-f", CRD_FILES[0])
    assert own_kubectl("apply", "-f", CRD_FILES[0]).stdout == (
        "customresourcedefinition.apiextensions.k8s.io/flowruns.flowlane.dev unchanged\n")


def test_an_applied_crd_is_established(own_kubectl: Kubectl) -> None:
    own_kubectl("apply", "-f", CRD_FILES[0])
    waited = own_kubectl("wait", "--for=condition=Established", "--timeout=5s", "crd/flowruns.flowlane.dev")
    assert waited.stdout == "customresourcedefinition.apiextensions.k8s.io/flowruns.flowlane.dev condition met\n"


def test_a_crd_serves_its_kind_until_it_is_deleted(own_kubectl: Kubectl) -> None:
    assert "doesn't have a resource type \"widgets\"" in own_kubectl("get", "widgets", check=False).stderr
    own_kubectl("apply", "-f", "-", input=WIDGET_CRD)
    own_kubectl("apply", "-f", "-", input="{apiVersion: example.com/v1, kind: Widget, metadata: {name: w1}, "
                                          "spec: {size: 3}}")
    assert own_kubectl("get", "wd", "w1", "-o", "jsonpath={.spec.size}").stdout == "3"
    assert rows(own_kubectl("get", "widgets").stdout)[0] == ["NAME", "AGE"]  # no printer columns: Name, Age
    own_kubectl("delete", "crd", "widgets.example.com")
    assert own_kubectl("get", "widgets", check=False).stderr == (  # discovery is cached, the server refuses
        'Error from server (NotFound): Unable to list "example.com/v1, Resource=widgets": '
        "the server could not find the requested resource\n")


def test_apply_creates_the_example_flowrun(crds: None, kubectl: Kubectl, kube: KubeApi) -> None:
    assert kubectl("apply", "-f", str(EXAMPLE)).stdout == "flowrun.flowlane.dev/math-mini created\n"
    stored = kube.get(FLOWRUNS, "math-mini")
    assert stored is not None
    assert stored["metadata"]["namespace"] == kube.namespace
    assert stored["metadata"]["generation"] == 1
    assert stored["spec"]["schedule"] == {"steps": 12, "checkpointInterval": 4, "evalInterval": 0, "evalSplit": "test"}


def test_get_flowrun_as_yaml_is_the_stored_object(crds: None, kubectl: Kubectl, kube: KubeApi) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    shown = kubectl("get", "fr", "math-mini", "-o", "yaml").stdout
    assert shown.startswith("apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata:\n")
    assert f"  namespace: {kube.namespace}\n" in shown
    assert "    planner: smollm2-135m-instruct\n" in shown


def test_reapplying_an_edit_patches_the_spec_and_bumps_the_generation(
    crds: None, kubectl: Kubectl, kube: KubeApi
) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    edited = edited_example(**{"steps: 12 ": "steps: 20 "})
    assert kubectl("apply", "-f", "-", input=edited).stdout == "flowrun.flowlane.dev/math-mini configured\n"
    assert kubectl("apply", "-f", "-", input=edited).stdout == "flowrun.flowlane.dev/math-mini unchanged\n"
    stored = kube.get(FLOWRUNS, "math-mini")
    assert stored is not None
    assert (stored["metadata"]["generation"], stored["spec"]["schedule"]["steps"]) == (2, 20)


def test_an_unknown_field_is_refused_by_strict_validation(crds: None, kubectl: Kubectl, kube: KubeApi) -> None:
    typo = edited_example(**{"maxStaleness: 0 ": "maxStalenes: 0 "})
    refused = kubectl("apply", "-f", "-", input=typo, check=False)
    assert refused.returncode == 1
    assert 'strict decoding error: unknown field "spec.maxStalenes"' in refused.stderr
    assert kube.get(FLOWRUNS, "math-mini") is None


def test_get_flowruns_shows_the_printer_columns_of_the_crd(crds: None, kubectl: Kubectl, kube: KubeApi) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    kube.patch(FLOWRUNS, "math-mini", {"status": {
        "phase": "Running", "step": 3, "policyVersion": 3, "staleness": 1, "lastWeightSyncSeconds": 2.5,
        "reward": 0.5, "restartCount": 1, "heldOutAccuracy": 0.25,
        "lastCheckpoint": "s3://ckpt/math-mini/step-3"}}, subresource="status")
    header, row = rows(kubectl("get", "flowruns").stdout)
    assert header == ["NAME", "PHASE", "STEP", "POLICY", "STALENESS", "SYNC-S", "REWARD", "RESTARTS", "AGE"]
    assert row[:8] == ["math-mini", "Running", "3", "3", "1", "2.5", "0.5", "1"]
    assert AGE.fullmatch(row[8])
    header, row = rows(kubectl("get", "fr", "math-mini", "-o", "wide").stdout)
    assert header == ["NAME", "PHASE", "STEP", "POLICY", "STALENESS", "SYNC-S", "REWARD", "RESTARTS", "ACCURACY",
                      "CHECKPOINT", "AGE"]
    assert row[:10] == ["math-mini", "Running", "3", "3", "1", "2.5", "0.5", "1", "0.25", "s3://ckpt/math-mini/step-3"]


def test_printer_columns_without_a_status_are_blank(crds: None, kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    header, row = kubectl("get", "flowruns").stdout.splitlines()
    assert re.fullmatch(r"math-mini +\d+s", row)
    assert row.index(row.split()[-1]) == header.index("AGE")


def test_delete_flowrun_removes_it(crds: None, kubectl: Kubectl, kube: KubeApi) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    deleted = kubectl("delete", "flowrun", "math-mini")
    assert deleted.stdout == f'flowrun.flowlane.dev "math-mini" deleted from {kube.namespace} namespace\n'
    assert kube.get(FLOWRUNS, "math-mini") is None
    assert kubectl("get", "fr", "math-mini", check=False).stderr == (
        'Error from server (NotFound): flowruns.flowlane.dev "math-mini" not found\n')


def two_container_pod(kube: KubeApi) -> None:
    kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "math-mini-rollout-0"},
                       "spec": {"containers": [{"name": "worker", "image": "w"}, {"name": "engine", "image": "e"}]}})
    kube.set_pod_phase("math-mini-rollout-0", "Running", containerStatuses=[
        {"name": "worker", "ready": True, "restartCount": 2}, {"name": "engine", "ready": False, "restartCount": 0}])


def test_get_pods_shows_ready_status_and_restarts(kubectl: Kubectl, kube: KubeApi) -> None:
    two_container_pod(kube)
    header, row = rows(kubectl("get", "pods").stdout)
    assert header == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert row[:4] == ["math-mini-rollout-0", "1/2", "Running", "2"]
    assert AGE.fullmatch(row[4])


def test_delete_pod_removes_it(kubectl: Kubectl, kube: KubeApi) -> None:
    two_container_pod(kube)
    deleted = kubectl("delete", "pod", "math-mini-rollout-0")
    assert deleted.stdout == f'pod "math-mini-rollout-0" deleted from {kube.namespace} namespace\n'
    assert kube.names(PODS) == []


def test_a_strategic_merge_patch_applies_as_a_merge_patch(kubectl: Kubectl, kube: KubeApi) -> None:
    two_container_pod(kube)
    kubectl("patch", "pod", "math-mini-rollout-0", "-p", '{"metadata": {"labels": {"flowlane.dev/role": "rollout"}}}')
    pod: Any = kube.get(PODS, "math-mini-rollout-0")
    assert pod["metadata"]["labels"] == {"flowlane.dev/role": "rollout"}
    assert [c["name"] for c in pod["spec"]["containers"]] == ["worker", "engine"]


def test_get_events_shows_what_happened_to_which_object(kubectl: Kubectl, kube: KubeApi) -> None:
    kube.create(EVENTS, {"metadata": {"name": "math-mini.1"}, "type": "Normal", "reason": "Created",
                         "message": "created 3 pods", "lastTimestamp": "2020-01-01T00:00:00Z",
                         "involvedObject": {"kind": "FlowRun", "name": "math-mini", "namespace": kube.namespace}})
    header, row = kubectl("get", "events").stdout.splitlines()
    assert header.split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert re.fullmatch(r"\d+y(\d+d)? +Normal +Created +flowrun/math-mini +created 3 pods", row)


def test_the_kubeconfig_defaults_to_the_tests_namespace(kubectl: Kubectl, kube: KubeApi) -> None:
    shown = kubectl("config", "view", "--minify", "-o", "jsonpath={.contexts[0].context.namespace}")
    assert shown.stdout == kube.namespace


def test_the_server_listens_on_the_host_it_is_given() -> None:
    server = KMockServer(host="127.0.0.2").start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.2:\d+", server.url)
        assert httpx.get(f"{server.url}/version").json()["major"] == "1"
    finally:
        server.stop()


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (119, "119s"), (150, "2m30s"), (240, "4m"), (600, "10m"), (179 * 60, "179m"),
    (3 * 3600 + 20 * 60, "3h20m"), (30 * 3600, "30h"), (3 * 86400 + 4 * 3600, "3d4h"), (10 * 86400, "10d"),
    (3 * 365 * 86400 + 30 * 86400, "3y30d"), (9 * 365 * 86400, "9y"),
])
def test_ages_read_as_kubectl_prints_them(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown
