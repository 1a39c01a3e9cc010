"""Validation at ``kubectl apply`` time: every cross-field rule of the spec is a CEL rule in the CRD.

For each rule, a bad spec is refused twice with the same field path: by the pydantic models (what
``flowlane run`` and the operator check) and by the rule's CEL text as the generated CRD file
carries it, evaluated the way the API server does (the emulator's ``cel_violations``: cel-python,
per schema node, defaults applied, the rule's ``fieldPath``). The repository's examples pass every
rule, and the real kubectl is refused by the emulator with the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from fixtures_kube import Kubectl, cel_violations
from test_kubectl import crds  # noqa: F401  (the fixture that applies the CRDs)

from flowlane.api.errors import ConfigError
from flowlane.api.flowrun import MAX_NAME_LENGTH, load_flowrun
from flowlane.api.flowservice import load_flowservice

REPO = Path(__file__).resolve().parent.parent


def crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / f"{plural}.flowlane.dev.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def flowrun(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowRun", "metadata": {"name": name}, "spec": spec}


LONG_NAME = "r" * (MAX_NAME_LENGTH + 1)
S3 = {"checkpointUri": "s3://b/demo"}
# (bad FlowRun, the field path both refusals name)
BAD_FLOWRUNS = {
    "evalSplit is the training split": (flowrun({"schedule": {"evalSplit": "train"}}), "spec.schedule.evalSplit"),
    "evalSplit is the given training split": (
        flowrun({"tasks": {"split": "all"}, "schedule": {"evalSplit": "all", "evalTasks": "arithmetic"}}),
        "spec.schedule.evalSplit"),
    "training on all of the evaluated dataset": (flowrun({"tasks": {"split": "all"}}), "spec.schedule.evalSplit"),
    "evaluating all of the trained dataset": (
        flowrun({"schedule": {"evalSplit": "all"}}), "spec.schedule.evalSplit"),
    "validationFraction 0 with mid-run evaluation": (
        flowrun({"schedule": {"validationFraction": 0}}), "spec.schedule.validationFraction"),
    "tensorParallelSize above the GPUs": (
        flowrun({"engine": {"tensorParallelSize": 2}, "rollout": {"resources": {"gpu": 1}}}),
        "spec.engine.tensorParallelSize"),
    "tensorParallelSize without GPUs": (
        flowrun({"engine": {"tensorParallelSize": 4}}), "spec.engine.tensorParallelSize"),
    "weightSync nccl": (flowrun({"engine": {"weightSync": "nccl"}}), "spec.engine.weightSync"),
    "reward judge without a judge model": (
        flowrun({"tasks": {"dataset": "/data/qa.jsonl", "reward": "judge"}}), "spec.tasks.reward"),
    "ranks other than the GPUs": (flowrun({"learner": {"ranks": 2, "resources": {"gpu": 1}}}), "spec.learner.ranks"),
    "credentialsSecret without s3": (
        flowrun({"storage": {"checkpointUri": "file:///ckpt", "credentialsSecret": {"name": "s3"}}}),
        "spec.storage.credentialsSecret"),
    "s3Endpoint without s3": (flowrun({"storage": {"s3Endpoint": "http://minio:9000"}}), "spec.storage.s3Endpoint"),
    "volumeClaimName without file:///": (
        flowrun({"storage": {**S3, "volumeClaimName": "ckpt"}}), "spec.storage.volumeClaimName"),
    "checkpointInterval above steps": (
        flowrun({"schedule": {"steps": 5, "checkpointInterval": 10}}), "spec.schedule.checkpointInterval"),
    "minTurns above maxTurns": (flowrun({"algorithm": {"minTurns": 4}}), "spec.algorithm.minTurns"),
    "minTurns above evalMaxTurns": (
        flowrun({"algorithm": {"minTurns": 3}, "schedule": {"evalMaxTurns": 2}}), "spec.schedule.evalMaxTurns"),
    "a name too long for its children": (flowrun({}, name=LONG_NAME), "metadata.name"),
    "a pod label of the operator's": (
        flowrun({"podTemplate": {"labels": {"flowlane.dev/role": "x"}}}), "spec.podTemplate.labels"),
    "a pod annotation of the operator's": (
        flowrun({"podTemplate": {"annotations": {"flowlane.dev/spec-hash": "x"}}}), "spec.podTemplate.annotations"),
}


@pytest.mark.parametrize("case", list(BAD_FLOWRUNS))
def test_each_rule_refuses_its_bad_flowrun_in_pydantic_and_in_the_crd_with_the_field_path(case: str) -> None:
    obj, path = BAD_FLOWRUNS[case]
    with pytest.raises(ConfigError) as refused:
        load_flowrun(yaml.safe_dump(obj))
    assert f"{path}" in str(refused.value)
    violations = cel_violations(crd_schema("flowruns"), obj)
    assert [v.split(":", 1)[0] for v in violations] == [path]


@pytest.mark.parametrize("obj", [
    flowrun({"schedule": {"evalSplit": "train", "evalTasks": "gsm8k"}}),  # another dataset's train split
    flowrun({"schedule": {"validationFraction": 0, "evalInterval": 0}}),
    flowrun({"engine": {"tensorParallelSize": 2}, "rollout": {"resources": {"gpu": 2}}}),
    flowrun({"learner": {"ranks": 2}}),
    flowrun({"storage": {**S3, "credentialsSecret": {"name": "s3"}, "s3Endpoint": "http://minio:9000"}}),
    flowrun({"storage": {"checkpointUri": "file:///ckpt", "volumeClaimName": "ckpt"}}),
    flowrun({}, name="r" * MAX_NAME_LENGTH),
    flowrun({"podTemplate": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}}),
    flowrun({"algorithm": {"minTurns": 3}, "schedule": {"evalMaxTurns": 3}}),
], ids=["other-dataset", "no-validation", "tp-fits", "cpu-ranks", "s3", "pvc", "longest-name", "kueue-label",
        "turn-floor-at-both-budgets"])
def test_the_rules_accept_the_specs_next_to_their_bad_ones(obj: dict[str, Any]) -> None:
    load_flowrun(yaml.safe_dump(obj))
    assert cel_violations(crd_schema("flowruns"), obj) == []


@pytest.mark.parametrize("example", ["flowrun.yaml", "flowrun-cluster.yaml", "flowrun-multihop.yaml"])
def test_the_examples_pass_every_rule(example: str) -> None:
    obj = yaml.safe_load((REPO / "examples" / example).read_text())
    assert cel_violations(crd_schema("flowruns"), obj) == []


def test_a_flowservice_with_both_model_sources_is_refused_in_pydantic_and_in_the_crd() -> None:
    obj = {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowService", "metadata": {"name": "agent"},
           "spec": {"model": {"flowRun": {"name": "demo"}, "uri": "s3://b/ckpt"}}}
    with pytest.raises(ConfigError, match=r"spec\.model"):
        load_flowservice(yaml.safe_dump(obj))
    schema = crd_schema("flowservices")
    assert cel_violations(schema, obj) == ["spec.model: set exactly one of model.flowRun or model.uri"]
    assert cel_violations(schema, yaml.safe_load((REPO / "examples" / "flowservice.yaml").read_text())) == []


def test_a_flowservice_turn_floor_above_its_budget_is_refused_in_pydantic_and_in_the_crd() -> None:
    obj = {"apiVersion": "flowlane.dev/v1alpha1", "kind": "FlowService", "metadata": {"name": "agent"},
           "spec": {"model": {"uri": "s3://b/ckpt"}, "agent": {"maxTurns": 2, "minTurns": 3}}}
    with pytest.raises(ConfigError, match=r"spec\.agent\.minTurns: must be <= maxTurns \(2\), got 3"):
        load_flowservice(yaml.safe_dump(obj))
    schema = crd_schema("flowservices")
    assert cel_violations(schema, obj) == ["spec.agent.minTurns: minTurns must be <= maxTurns"]
    obj["spec"]["agent"] = {"minTurns": 11}  # maxTurns' default, 10, is the bound
    assert cel_violations(schema, obj) == ["spec.agent.minTurns: minTurns must be <= maxTurns"]
    obj["spec"]["agent"] = {"minTurns": 10}
    assert cel_violations(schema, obj) == []


def test_every_rule_in_the_crds_compiles_and_names_its_field() -> None:
    def rules(schema: Any) -> list[dict[str, Any]]:
        if isinstance(schema, dict):
            return list(schema.get("x-kubernetes-validations", [])) + [r for v in schema.values() for r in rules(v)]
        return [r for v in schema for r in rules(v)] if isinstance(schema, list) else []

    flowrun_rules = rules(crd_schema("flowruns"))
    assert len(flowrun_rules) == len({path for _, path in BAD_FLOWRUNS.values()})  # each has its bad spec here
    for rule in flowrun_rules + rules(crd_schema("flowservices")):
        celpy.Environment().compile(rule["rule"])
        assert rule["message"]


@pytest.mark.usefixtures("crds")
def test_kubectl_apply_of_a_bad_flowrun_is_refused_with_the_field_path(kubectl: Kubectl) -> None:
    bad, _ = BAD_FLOWRUNS["tensorParallelSize above the GPUs"]
    refused = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert refused.returncode == 1
    assert 'FlowRun.flowlane.dev "demo" is invalid: spec.engine.tensorParallelSize: tensorParallelSize is more ' \
        "than the rollout pod's GPUs" in refused.stderr
    good = {**bad, "spec": {**bad["spec"], "rollout": {"resources": {"gpu": 2}}}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(good))
