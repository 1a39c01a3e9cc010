"""Render a FlowService into Kubernetes objects: pure functions, like ``render`` for a FlowRun.

A FlowService renders to a Deployment of gateway pods (a rolling update with ``maxUnavailable: 0``
gives a checkpoint change no downtime) and a ClusterIP Service in front of them. The pods are
built from the FlowRun pods' blocks (labels, resources, scheduling, security context, the model
volume), so both kinds of pod get the same hardening.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowlane.api.flowrun import tool_secret_env
from flowlane.api.flowservice import KIND as FLOWSERVICE_KIND
from flowlane.api.flowservice import FlowService
from flowlane.operator.graph import ENV_S3_ACCESS_KEY, ENV_S3_ENDPOINT, ENV_S3_SECRET_KEY
from flowlane.operator.render import (
    ANNOTATION_CHECKPOINT,
    ANNOTATION_HASH,
    DROP_ALL,
    LABEL_COMPONENT,
    LABEL_FLOWSERVICE,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGED_BY,
    POD_SECURITY_CONTEXT,
    SHM_MOUNT,
    SHM_VOLUME,
    Owner,
    RenderOptions,
    container_resources,
    content_hash,
    model_volume,
    object_meta,
    pod_scheduling,
)

GATEWAY_COMPONENT = "gateway"
ENV_GATEWAY_API_KEY = "FLOWLANE_API_KEY"  # the bearer token runtime/serving/gateway.py requires on /v1/*


def gateway_name(service: str) -> str:
    return f"{service}-gateway"


def service_labels(service: str) -> dict[str, str]:
    return {LABEL_NAME: "flowlane", LABEL_INSTANCE: service, LABEL_PART_OF: "flowlane",
            LABEL_MANAGED_BY: MANAGED_BY, LABEL_FLOWSERVICE: service, LABEL_COMPONENT: GATEWAY_COMPONENT}


def service_endpoint(fsvc: FlowService) -> str:
    return f"http://{fsvc.name}.{fsvc.namespace}.svc:{fsvc.spec.port}/v1"


@dataclass
class RenderedService:
    deployment: dict[str, Any]
    service: dict[str, Any]

    def children(self) -> list[dict[str, Any]]:
        return [self.deployment, self.service]


def gateway_command(fsvc: FlowService, checkpoint: str, trained_min_turns: int | None = None) -> list[str]:
    """``flowlane serve`` for this FlowService (runtime/serving/gateway.py's flags).

    ``trained_min_turns``: the served FlowRun's ``algorithm.minTurns``, the default of ``agent.minTurns``.
    """
    spec = fsvc.spec
    fixed = ["--fixed", spec.model.fixed] if spec.model.fixed else []
    return ["flowlane", "serve", "--model", checkpoint, *fixed, "--dtype", spec.model.dtype.value,
            "--served-model-name", fsvc.name,
            "--engine", spec.engine.kind.value, "--max-model-len", str(spec.engine.max_model_len),
            "--tools", ",".join(t.name for t in spec.tools),
            "--host", "0.0.0.0", "--port", str(spec.port), "--max-turns", str(spec.agent.max_turns),
            "--min-turns", str(spec.agent.turn_floor(trained_min_turns)),
            "--max-time-s", f"{spec.agent.timeout_seconds:g}",
            "--max-concurrent-runs", str(spec.agent.max_concurrent_requests),
            "--history-max-tokens", str(spec.agent.history_max_tokens)]


def render_flowservice(fsvc: FlowService, *, checkpoint: str, storage_env: Sequence[dict[str, Any]] = (),
                       options: RenderOptions | None = None,
                       checkpoint_volume: tuple[str, str] | None = None,
                       trained_min_turns: int | None = None) -> RenderedService:
    """Children of ``fsvc`` serving ``checkpoint``; ``storage_env`` carries S3 settings for it.

    ``trained_min_turns`` is the served FlowRun's ``algorithm.minTurns`` (``agent.minTurns``'s default).

    A ``file://`` checkpoint lives on its FlowRun's checkpoint PVC: ``checkpoint_volume`` is that
    claim and the path the learner mounts it at; the gateway pods mount it read-only there too.

    The model id clients send is the FlowService's name, so it stays the same across checkpoints.
    """
    options = options or RenderOptions()
    owner = Owner(FLOWSERVICE_KIND, fsvc.name, fsvc.namespace, fsvc.metadata.uid)
    labels = service_labels(fsvc.name)
    selector = {LABEL_FLOWSERVICE: fsvc.name, LABEL_COMPONENT: GATEWAY_COMPONENT}
    env: list[dict[str, Any]] = [{"name": "FLOWLANE_SERVICE", "value": fsvc.name}, *storage_env]
    if fsvc.spec.auth is not None:
        env.append({"name": ENV_GATEWAY_API_KEY,
                    "valueFrom": {"secretKeyRef": {"name": fsvc.spec.auth.name, "key": fsvc.spec.auth.key}}})
    for tool in fsvc.spec.tools:
        if tool.credentials_secret is not None:
            env.append({"name": tool_secret_env(tool.name), "valueFrom": {"secretKeyRef": {
                "name": tool.credentials_secret.name, "key": tool.credentials_secret.key}}})
    port = fsvc.spec.port
    container: dict[str, Any] = {
        "name": GATEWAY_COMPONENT,
        "image": fsvc.spec.resources.image or options.gateway_image,
        "imagePullPolicy": options.image_pull_policy,
        "command": gateway_command(fsvc, checkpoint, trained_min_turns),
        "env": env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": container_resources(fsvc.spec.resources, options.gpu_resource_name),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20,
                          "failureThreshold": 3, "initialDelaySeconds": 30},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": dict(DROP_ALL, runAsNonRoot=True),
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, SHM_VOLUME]
    model_volumes, model_mounts = model_volume(fsvc.spec.model.volume)
    volumes += model_volumes
    container["volumeMounts"] += [SHM_MOUNT, *model_mounts]
    if checkpoint.startswith("file://") and checkpoint_volume:
        claim, root = checkpoint_volume
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        container["volumeMounts"].append({"name": "checkpoints", "mountPath": root, "readOnly": True})
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(gateway_name(fsvc.name), owner, labels, {ANNOTATION_CHECKPOINT: checkpoint}),
        "spec": {
            "replicas": fsvc.spec.replicas,
            "selector": {"matchLabels": selector},
            # A new checkpoint starts a new pod before an old one stops: no downtime.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": fsvc.spec.pod_template.labels | labels,
                             "annotations": fsvc.spec.pod_template.annotations | {ANNOTATION_CHECKPOINT: checkpoint}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY_CONTEXT,
                    "containers": [container],
                    "volumes": volumes,
                    **pod_scheduling(fsvc.spec.resources),
                    **options.pod_extras(fsvc.spec.pod_template),
                },
            },
        },
    }
    deployment["metadata"]["annotations"][ANNOTATION_HASH] = content_hash(deployment["spec"])
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(fsvc.name, owner, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }
    service["metadata"]["annotations"] = {ANNOTATION_HASH: content_hash(service["spec"])}
    return RenderedService(deployment=deployment, service=service)


def s3_env(endpoint: str | None, secret: Any) -> list[dict[str, Any]]:
    """Environment for reading an s3:// checkpoint (``secret`` is an ``S3CredentialsSecret``)."""
    env: list[dict[str, Any]] = []
    if endpoint:
        env.append({"name": ENV_S3_ENDPOINT, "value": endpoint})
    if secret is not None:
        env.append({"name": ENV_S3_ACCESS_KEY,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_key}}})
        env.append({"name": ENV_S3_SECRET_KEY,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_key_key}}})
    return env
