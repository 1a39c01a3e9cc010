"""The generated CRDs: no drift, valid for Kubernetes, structural, and they reject bad FlowRuns by path."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from flowlane.api import crdgen
from flowlane.api.flowrun import FlowRunSpec, FlowRunStatus, load_flowrun
from flowlane.api.flowservice import FlowServiceStatus, load_flowservice

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = kubernetes_validate.latest_version()


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def flowrun_schema() -> dict[str, Any]:
    return schema_of(crdgen.flowrun_crd())


def as_json_schema(node: Any) -> Any:
    """Kubernetes' OpenAPI v3.0 dialect -> JSON Schema draft 4 (nullable becomes a null type)."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "enum" in out and isinstance(out.get("type"), list):
        out["enum"] = [*out["enum"], None]
    return out


def validation_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(as_json_schema(schema))
    return sorted(
        ".".join(str(p) for p in error.absolute_path) + ": " + error.validator
        for error in validator.iter_errors(obj)
    )


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for name, sub in node.get("properties", {}).items():
            yield from walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("out_dir", ["crds", "charts/flowlane/crds"])
def test_committed_crds_match_the_models(out_dir: str) -> None:
    for crd in crdgen.all_crds():
        committed = (REPO / out_dir / crdgen.crd_file_name(crd)).read_text(encoding="utf-8")
        assert committed == crdgen.render_yaml(crd), f"{out_dir} is stale: run `flowlane generate`"


def test_generate_writes_every_crd_into_every_folder(tmp_path: Path) -> None:
    written = crdgen.generate([tmp_path / "a", tmp_path / "b"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "a/flowruns.flowlane.dev.yaml", "a/flowservices.flowlane.dev.yaml",
        "b/flowruns.flowlane.dev.yaml", "b/flowservices.flowlane.dev.yaml",
    ]


@pytest.mark.parametrize("crd", crdgen.all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_validates_against_current_kubernetes(crd: dict[str, Any]) -> None:
    # raises kubernetes_validate.ValidationError naming the offending path
    assert kubernetes_validate.validate(crd, KUBERNETES, strict=True) == ".".join(KUBERNETES.split(".")[:2])


@pytest.mark.parametrize("crd", crdgen.all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in walk(schema_of(crd)):
        assert "$ref" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") and node["anyOf"] == [
                {"type": "integer"}, {"type": "string"}], f"{path}: anyOf is only allowed for int-or-string"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("type") != "null", path


def test_flowrun_crd_has_status_subresource_printer_columns_and_short_name() -> None:
    crd = crdgen.flowrun_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "Phase", "Step", "Policy", "Staleness", "Sync-s", "Reward", "Restarts", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["fr"]
    assert crd["spec"]["names"]["categories"] == ["flowlane"]


def test_flowservice_crd_can_be_scaled_and_is_called_fsvc() -> None:
    crd = crdgen.flowservice_crd()
    assert crd["spec"]["versions"][0]["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}
    assert crd["spec"]["names"]["shortNames"] == ["fsvc"]


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    for crd in crdgen.all_crds():
        for path, node in walk(schema_of(crd)):
            if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")) \
                    and not path.startswith(".spec.tools[].options"):
                assert node.get("description"), f"{crd['metadata']['name']}{path}: no description"


def test_quantities_are_int_or_string_with_the_kubernetes_pattern() -> None:
    cpu = flowrun_schema()["properties"]["spec"]["properties"]["rollout"]["properties"]["resources"]["properties"][
        "cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True
    assert cpu["default"] == "1"
    assert "pattern" in cpu


@pytest.mark.parametrize(("patch", "expected"), [
    ({"rollout": {"replicas": 0}}, "spec.rollout.replicas: minimum"),
    ({"algorithm": {"klEstimator": "k2"}}, "spec.algorithm.klEstimator: enum"),
    ({"algorithm": {"clipLow": 1.0}}, "spec.algorithm.clipLow: maximum"),
    ({"algorithm": {"ppoEpochs": 0}}, "spec.algorithm.ppoEpochs: minimum"),
    ({"schedule": {"validationFraction": 0.6}}, "spec.schedule.validationFraction: maximum"),
    ({"algorithm": {"miniBatches": 0}}, "spec.algorithm.miniBatches: minimum"),
    ({"rollout": {"resources": {"cpu": "lots"}}}, "spec.rollout.resources.cpu: pattern"),
    ({"storage": {"checkpointUri": "http://x"}}, "spec.storage.checkpointUri: pattern"),
    ({"tools": [{"name": "Bad Name"}]}, "spec.tools.0.name: pattern"),
    ({"sandbox": {"limits": {"memoryMiB": "lots"}}}, "spec.sandbox.limits.memoryMiB: type"),
    ({"suspend": "yes"}, "spec.suspend: type"),
])
def test_crd_schema_rejects_invalid_flowrun_with_the_field_path(patch: dict[str, Any], expected: str) -> None:
    obj = {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": "bad"}, "spec": patch}
    assert validation_errors(obj, flowrun_schema()) == [expected]


def test_crd_schema_accepts_the_examples() -> None:
    for name in ("flowrun.yaml", "flowrun-cluster.yaml", "flowrun-multihop.yaml"):
        obj = yaml.safe_load((REPO / "examples" / name).read_text())
        assert validation_errors(obj, flowrun_schema()) == [], name
    obj = yaml.safe_load((REPO / "examples" / "flowservice.yaml").read_text())
    assert validation_errors(obj, schema_of(crdgen.flowservice_crd())) == []


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """What the API server does with the schema's defaults (structural defaulting)."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        out = dict(obj)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in obj]
    return obj


def test_crd_defaults_equal_the_model_defaults() -> None:
    spec_schema = flowrun_schema()["properties"]["spec"]
    defaulted = apply_defaults({}, spec_schema)
    assert defaulted == FlowRunSpec().to_data()


def test_crd_defaults_of_a_partial_object_equal_the_model_defaults() -> None:
    partial = {"rollout": {"resources": {"cpu": "2"}}, "tools": [{"name": "search"}]}
    defaulted = apply_defaults(partial, flowrun_schema()["properties"]["spec"])
    assert defaulted == FlowRunSpec.model_validate(partial).to_data()


def all_status_fields(model: type[FlowRunStatus] | type[FlowServiceStatus]) -> dict[str, Any]:
    """A status with every field set, as the operator would write it."""
    now = "2025-01-01T00:00:00Z"
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        text = str(field.annotation)
        if name == "conditions":
            values[alias] = [{"type": "Ready", "status": "True", "reason": "Ok", "message": "m",
                              "lastTransitionTime": now, "observedGeneration": 1}]
        elif name == "phase":
            values[alias] = "Failed" if model is FlowRunStatus else "Ready"
        elif "datetime" in text:
            values[alias] = now
        elif "dict" in text:
            values[alias] = {"rollout-0": 1}
        elif "int" in text:
            values[alias] = 1
        elif "float" in text:
            values[alias] = 0.5
        else:
            values[alias] = "s3://b/ckpt"
    model.model_validate(values)  # the values are ones the operator can write
    return values


@pytest.mark.parametrize(("crd", "model"), [(crdgen.flowrun_crd(), FlowRunStatus),
                                            (crdgen.flowservice_crd(), FlowServiceStatus)])
def test_status_schema_keeps_everything_the_operator_writes(crd: dict[str, Any], model: Any) -> None:
    status_schema = schema_of(crd)["properties"]["status"]
    status = all_status_fields(model)

    def pruned(obj: Any, schema: dict[str, Any], path: str) -> list[str]:
        if isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):  # a map: keys kept
            return [p for k, v in obj.items() for p in pruned(v, schema["additionalProperties"], f"{path}.{k}")]
        if isinstance(obj, dict):
            props = schema.get("properties", {})
            out = [f"{path}.{k}" for k in obj if k not in props]
            return out + [p for k, v in obj.items() if k in props for p in pruned(v, props[k], f"{path}.{k}")]
        if isinstance(obj, list):
            return [p for item in obj for p in pruned(item, schema.get("items", {}), f"{path}[]")]
        return []

    assert pruned(status, status_schema, "status") == []
    assert validation_errors(status, status_schema) == []


def test_example_objects_still_load_after_crd_defaulting() -> None:
    obj = yaml.safe_load((REPO / "examples" / "flowrun-cluster.yaml").read_text())
    obj["spec"] = apply_defaults(obj["spec"], flowrun_schema()["properties"]["spec"])
    assert load_flowrun(yaml.safe_dump(obj)).spec == load_flowrun(REPO / "examples" / "flowrun-cluster.yaml").spec
    svc = yaml.safe_load((REPO / "examples" / "flowservice.yaml").read_text())
    svc["spec"] = apply_defaults(svc["spec"], schema_of(crdgen.flowservice_crd())["properties"]["spec"])
    assert load_flowservice(yaml.safe_dump(svc)).spec.replicas == 2
