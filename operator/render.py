"""Render a FlowRun's process graph into Kubernetes objects: pure functions.

Everything here maps values to manifests; nothing talks to the API server, so every object the
operator can create is checked by tests against the real Kubernetes schemas.

**Why bare Pods, not StatefulSets or Jobs.** A FlowRun is one cooperating group: the learner holds
the policy and the task cursor, rollout workers hold engines loaded with a given policy version,
and a lost member leaves the rest inconsistent. The recovery that is always correct is the one the
best training operators use (KubeRay's and Kubeflow's group restarts, LeaderWorkerSet's
RecreateGroupOnPodRestart): stop the whole group and start it again from the latest checkpoint,
counting the restart against ``backoffLimit``. StatefulSets and Jobs restart pods one at a time on
their own and keep no group-wide budget; so the operator owns learner and rollout Pods with
``restartPolicy: Never`` directly. Sandboxes are the exception: stateless servers that the kubelet
restarts in place (``Always``), while the rollout workers see tool errors meanwhile. Names are
deterministic (``<run>-learner``, ``<run>-rollout-0``, ...), which makes
every create idempotent, and each pod carries the group *epoch* (the restart count it was created
for) and a hash of everything it was rendered from, so a stale pod is recognised after an operator
restart and a spec change rolls exactly the pods it affects.

Other children: one headless Service per serving component (``<run>-learner``,
``<run>-sandbox-N``) so components reach each other at ``<service>.<namespace>.svc`` on fixed
ports; a ConfigMap with the run config every component reads; a NetworkPolicy that lets only the
run's rollout workers reach its sandboxes and lets sandboxes reach nothing; a PodDisruptionBudget
that keeps drains from evicting the learner and rollout pods (one lost member restarts the
group); and, when the spec names no token Secret, a generated one. Everything carries an owner
reference to the FlowRun, so the garbage collector removes it with the run.

Several learner pods (``learner.replicas > 1``: torch nodes of one world) share one headless
Service for their group instead, ``<run>-learner``, the way Kubeflow Trainer wires torch jobs:
each pod sets ``hostname`` and ``subdomain`` and so has a stable DNS name,
``<run>-learner-<i>.<run>-learner.<namespace>.svc``; ``--master-addr`` is learner-0's. The
Service publishes not-ready addresses, because every rank must resolve rank 0 before any pod is
Ready. They are group members like the rest: a failed one restarts the whole run.

A FlowService's objects are rendered by ``render_service``, from the same building blocks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from flowlane.api.common import GROUP_VERSION, PodTemplate, Resources
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import FlowRun, ModelVolume
from flowlane.operator.graph import (
    ENV_GRPC_TOKEN,
    POD_CONFIG_PATH,
    Component,
    Port,
    ProcessGraph,
    Protocol,
    Role,
    SecretEnv,
    compile_graph,
    resolve,
)

# Labels every child carries; selectors use the flowlane.dev ones.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "flowlane-operator"
LABEL_FLOWRUN = "flowlane.dev/flowrun"
LABEL_FLOWSERVICE = "flowlane.dev/flowservice"
LABEL_ROLE = "flowlane.dev/role"
LABEL_MEMBER = "flowlane.dev/component"
LABEL_GROUP = "flowlane.dev/group"  # pods addressed through one headless Service (several learner pods)
LABEL_EPOCH = "flowlane.dev/epoch"
ANNOTATION_HASH = "flowlane.dev/spec-hash"
ANNOTATION_CHECKPOINT = "flowlane.dev/checkpoint"
# Kueue's plain-Pod integration: a queue-name label (spec.podTemplate.labels) queues the pods; a
# group name and total count make the run's pods one workload, admitted whole or not at all.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"  # the scheduling gate Kueue lifts on admission

# libyaml's emitter writes the same text ~10x faster; the pure-Python one is the fallback.
_YAML_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

CONFIG_VOLUME = "run-config"
CONFIG_FILE = "run.yaml"
SANDBOX_SCRATCH_LIMIT = "256Mi"
# Local state of a component (default stores, temp files): the pod's scratch volume.
ENV_RUN_DIR = "FLOWLANE_RUN_DIR"
POD_RUN_DIR = "/tmp/flowlane-run"


@dataclass(frozen=True)
class RenderOptions:
    """Cluster-wide choices that are not part of a FlowRun: images and the GPU resource name."""

    learner_image: str = "ghcr.io/flowlane/flowlane-learner:0.1.0"
    rollout_image: str = "ghcr.io/flowlane/flowlane-rollout:0.1.0"
    sandbox_image: str = "ghcr.io/flowlane/flowlane-sandbox:0.1.0"
    gateway_image: str = "ghcr.io/flowlane/flowlane-gateway:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    gpu_resource_name: str = "nvidia.com/gpu"
    #: Secrets for a private registry (the chart's imagePullSecrets), on every pod the operator renders.
    image_pull_secrets: tuple[str, ...] = ()

    def pod_extras(self, template: PodTemplate | None = None) -> dict[str, Any]:
        """Pod spec fields from these options and a resource's ``podTemplate`` (pull secrets: both)."""
        template = template or PodTemplate()
        secrets = list(dict.fromkeys([*self.image_pull_secrets, *template.image_pull_secrets]))
        extras: dict[str, Any] = {"imagePullSecrets": [{"name": n} for n in secrets]} if secrets else {}
        for key, value in (("priorityClassName", template.priority_class_name),
                           ("schedulerName", template.scheduler_name),
                           ("serviceAccountName", template.service_account_name)):
            if value:
                extras[key] = value
        return extras

    def image_for(self, role: Role) -> str:
        return {Role.LEARNER: self.learner_image, Role.ROLLOUT: self.rollout_image,
                Role.SANDBOX: self.sandbox_image}[role]


@dataclass(frozen=True)
class Owner:
    """The resource that owns rendered children (its uid makes the owner reference)."""

    kind: str
    name: str
    namespace: str
    uid: str | None
    api_version: str = GROUP_VERSION

    def reference(self) -> list[dict[str, Any]]:
        if not self.uid:
            return []
        return [{"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid,
                 "controller": True, "blockOwnerDeletion": True}]


@dataclass
class RenderedRun:
    """Every child object of one FlowRun, grouped by what the operator does with them."""

    config_map: dict[str, Any]
    services: list[dict[str, Any]]
    network_policy: dict[str, Any]
    pods: list[dict[str, Any]]
    token_secret_name: str | None  # set when the operator must create the token Secret
    graph: ProcessGraph = field(repr=False)
    disruption_budget: dict[str, Any] = field(default_factory=dict)

    def static_children(self) -> list[dict[str, Any]]:
        """Children that live as long as the run (not stopped by suspend or completion)."""
        return [self.config_map, *self.services, self.network_policy,
                *([self.disruption_budget] if self.disruption_budget else [])]


# -- names and labels -----------------------------------------------------------------------------


def child_name(run: str, component: str) -> str:
    return f"{run}-{component}"


def config_map_name(run: str) -> str:
    return f"{run}-config"


def network_policy_name(run: str) -> str:
    return f"{run}-sandbox-policy"


def disruption_budget_name(run: str) -> str:
    return f"{run}-pdb"


def run_labels(run: str) -> dict[str, str]:
    return {LABEL_NAME: "flowlane", LABEL_INSTANCE: run, LABEL_PART_OF: "flowlane",
            LABEL_MANAGED_BY: MANAGED_BY, LABEL_FLOWRUN: run}


def component_labels(run: str, component: Component) -> dict[str, str]:
    labels = run_labels(run) | {LABEL_COMPONENT: component.role.value, LABEL_ROLE: component.role.value,
                                LABEL_MEMBER: component.name}
    if component.group:
        labels[LABEL_GROUP] = component.group
    return labels


def role_selector(run: str, role: Role) -> dict[str, str]:
    return {LABEL_FLOWRUN: run, LABEL_ROLE: role.value}


def object_meta(name: str, owner: Owner, labels: Mapping[str, str],
          annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    refs = owner.reference()
    if refs:
        meta["ownerReferences"] = refs
    return meta


def _dump_yaml(data: Any) -> str:
    return str(yaml.dump(data, Dumper=_YAML_DUMPER, sort_keys=False))


def content_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able data (what a pod was rendered from)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- FlowRun ---------------------------------------------------------------------------------------


def kubernetes_address(graph: ProcessGraph) -> tuple[Any, Any]:
    """The address and port lookups the Kubernetes backend gives to ``graph.resolve``."""

    def port_of(component: str, port: str) -> int:
        return graph.component(component).port(port).number

    def address_of(component: str, port: str) -> str:
        group = graph.component(component).group
        # A group member is <hostname>.<group Service>; any other component is its own Service.
        service = child_name(graph.run, component) + (f".{child_name(graph.run, group)}" if group else "")
        return f"{service}.{graph.namespace}.svc:{port_of(component, port)}"

    return address_of, port_of


def render_flowrun(flowrun: FlowRun, *, epoch: int, options: RenderOptions | None = None) -> RenderedRun:
    """All children of ``flowrun`` for group epoch ``epoch`` (its restart count)."""
    options = options or RenderOptions()
    graph = compile_graph(flowrun, config_path=POD_CONFIG_PATH)
    owner = Owner(FLOWRUN_KIND, flowrun.name, flowrun.namespace, flowrun.metadata.uid)
    config_text = _dump_yaml(graph.config)
    config_map: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(config_map_name(flowrun.name), owner, run_labels(flowrun.name)),
        "data": {CONFIG_FILE: config_text},
    }
    config_map["metadata"]["annotations"] = {ANNOTATION_HASH: content_hash(config_map["data"])}
    groups = {c.group: c for c in reversed(graph.components) if c.group}  # each group's first member
    services = [_headless_service(graph, c, owner) if not c.group else _group_service(graph, c.group, owner)
                for c in graph.components if (c.ports and not c.group) or (c.group and groups[c.group] is c)]
    for svc in services:
        svc["metadata"]["annotations"] = {ANNOTATION_HASH: content_hash(svc["spec"])}
    policy = _sandbox_network_policy(graph, owner)
    policy["metadata"]["annotations"] = {ANNOTATION_HASH: content_hash(policy["spec"])}
    pods = [_pod(graph, c, owner, flowrun, epoch, options, config_text) for c in graph.components]
    budget = _group_disruption_budget(graph, owner)
    budget["metadata"]["annotations"] = {ANNOTATION_HASH: content_hash(budget["spec"])}
    return RenderedRun(
        config_map=config_map,
        services=services,
        network_policy=policy,
        pods=pods,
        token_secret_name=graph.token.secret if graph.token_generated else None,
        graph=graph,
        disruption_budget=budget,
    )


def render_token_secret(flowrun: FlowRun, token: str) -> dict[str, Any]:
    """The generated gRPC token Secret (created once, never updated)."""
    owner = Owner(FLOWRUN_KIND, flowrun.name, flowrun.namespace, flowrun.metadata.uid)
    name = compile_graph(flowrun).token.secret
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(name, owner, run_labels(flowrun.name)),
        "type": "Opaque",
        "stringData": {"token": token},
    }


def _headless_service(graph: ProcessGraph, component: Component, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(child_name(graph.run, component.name), owner, component_labels(graph.run, component)),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_FLOWRUN: graph.run, LABEL_MEMBER: component.name},
            "ports": [_service_port(p, target=p.name) for p in component.ports],
            "publishNotReadyAddresses": False,
        },
    }


def _service_port(port: Port, target: str | int) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": port.name, "port": port.number, "targetPort": target, "protocol": "TCP"}
    if port.protocol is not Protocol.TCP:  # plain TCP (a rendezvous store) has no application protocol
        spec["appProtocol"] = port.protocol.value
    return spec


def _group_service(graph: ProcessGraph, group: str, owner: Owner) -> dict[str, Any]:
    """One headless Service for a group of pods: each member's DNS name exists from its start."""
    members = graph.group(group)
    labels = run_labels(graph.run) | {LABEL_COMPONENT: members[0].role.value, LABEL_ROLE: members[0].role.value,
                                      LABEL_GROUP: group}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(child_name(graph.run, group), owner, labels),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_FLOWRUN: graph.run, LABEL_GROUP: group},
            "ports": [_service_port(p, target=p.number) for p in dict.fromkeys(p for c in members for p in c.ports)],
            # torchrun on every member resolves the first one before any member is Ready.
            "publishNotReadyAddresses": True,
        },
    }


def _sandbox_network_policy(graph: ProcessGraph, owner: Owner) -> dict[str, Any]:
    sandbox_ports = sorted({p.number for c in graph.by_role(Role.SANDBOX) for p in c.ports})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(network_policy_name(graph.run), owner, run_labels(graph.run)),
        "spec": {
            "podSelector": {"matchLabels": role_selector(graph.run, Role.SANDBOX)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": role_selector(graph.run, Role.ROLLOUT)}}],
                "ports": [{"protocol": "TCP", "port": port} for port in sandbox_ports],
            }],
            "egress": [],  # untrusted code reaches nothing, not even DNS
        },
    }


def _group_disruption_budget(graph: ProcessGraph, owner: Owner) -> dict[str, Any]:
    """No voluntary eviction (a node drain, the autoscaler) of a learner or rollout pod.

    Losing one of them restarts the whole group from the last checkpoint, so a drain waits until
    the run finishes or is suspended (``spec.suspend: true`` frees its nodes at once). Sandboxes
    are replaced alone and stay evictable.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(disruption_budget_name(graph.run), owner, run_labels(graph.run)),
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": {LABEL_FLOWRUN: graph.run}, "matchExpressions": [
                {"key": LABEL_ROLE, "operator": "In", "values": [Role.LEARNER.value, Role.ROLLOUT.value]}]},
        },
    }


def _env(plain: Mapping[str, str], secret: Mapping[str, SecretEnv], resolve_text: Any) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": resolve_text(v)} for k, v in sorted(plain.items())]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
        for k, ref in sorted(secret.items())
    ]
    return env


def container_resources(resources: Resources, gpu_name: str) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    limits: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpu:
        requests[gpu_name] = resources.gpu
        limits[gpu_name] = resources.gpu
    return {"requests": requests, "limits": limits}


def pod_scheduling(resources: Resources) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if resources.node_selector:
        spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        spec["tolerations"] = [t.to_data() for t in resources.tolerations]
    return spec


DROP_ALL = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
#: The images' user (10001) owns no volume a cluster provisions; fsGroup makes PVCs (checkpoints,
#: models) group-writable for it, as the kubelet applies it to every volume that supports ownership.
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch",
                                        "seccompProfile": {"type": "RuntimeDefault"}}


#: A pod's /dev/shm is 64 MiB unless a memory-backed volume replaces it. vLLM's engine processes
#: talk through a shared-memory ring that needs more (160 MiB on CPU), and NCCL and torch's
#: data loaders use it on GPUs; what a pod writes there counts against its memory limit.
SHM_SIZE_LIMIT = "1Gi"
SHM_VOLUME: dict[str, Any] = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}}
SHM_MOUNT: dict[str, Any] = {"name": "dshm", "mountPath": "/dev/shm"}


def model_volume(volume: ModelVolume | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model PVC (read-only) as a pod volume and its mount, or nothing."""
    if volume is None:
        return [], []
    return ([{"name": "models", "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": True}}],
            [{"name": "models", "mountPath": volume.mount_path, "readOnly": True}])


def _pod(graph: ProcessGraph, component: Component, owner: Owner, flowrun: FlowRun, epoch: int,
         options: RenderOptions, config_text: str) -> dict[str, Any]:
    address_of, port_of = kubernetes_address(graph)

    def resolve_text(text: str) -> str:
        return resolve(text, address_of, port_of)

    sandbox = component.role is Role.SANDBOX
    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(graph.run)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": SANDBOX_SCRATCH_LIMIT} if sandbox else {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": POD_CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if component.role in (Role.LEARNER, Role.ROLLOUT):
        model_volumes, model_mounts = model_volume(flowrun.spec.model.volume)
        volumes += [*model_volumes, SHM_VOLUME]
        mounts += [*model_mounts, SHM_MOUNT]
    storage = flowrun.spec.storage
    if storage.volume_claim_name and component.role is Role.LEARNER and storage.checkpoint_uri:
        volumes.append({"name": "checkpoints",
                        "persistentVolumeClaim": {"claimName": storage.volume_claim_name}})
        mounts.append({"name": "checkpoints", "mountPath": storage.checkpoint_uri.removeprefix("file://")})
    container: dict[str, Any] = {
        "name": component.role.value,
        "image": component.resources.image or options.image_for(component.role),
        "imagePullPolicy": options.image_pull_policy,
        # Servers bind every interface in a pod (the graph's commands default to loopback).
        "command": [resolve_text(arg) for arg in component.argv] + (["--host", "0.0.0.0"] if component.ports else []),
        "env": _env({**component.env, ENV_RUN_DIR: POD_RUN_DIR}, component.secret_env, resolve_text),
        "resources": container_resources(component.resources, options.gpu_resource_name),
        "volumeMounts": mounts,
        "securityContext": dict(DROP_ALL, runAsNonRoot=True)
        | ({"readOnlyRootFilesystem": True} if sandbox else {}),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if component.ports:
        container["ports"] = [{"name": p.name, "containerPort": p.number, "protocol": "TCP"}
                              for p in component.ports]
    if component.ready_port:
        container["readinessProbe"] = {"tcpSocket": {"port": component.ready_port},
                                       "periodSeconds": 5, "failureThreshold": 3}
    pod_spec: dict[str, Any] = {
        # Learner and rollout pods never restart alone: the operator restarts the whole group, counting
        # against backoffLimit. A sandbox is a stateless server: the kubelet restarts it in place.
        "restartPolicy": "Always" if component.service else "Never",
        "automountServiceAccountToken": False,  # components never talk to the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60 if component.role is Role.LEARNER else 30,
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [container],
        "volumes": volumes,
        **pod_scheduling(component.resources),
        **options.pod_extras(flowrun.spec.pod_template),
        **({"runtimeClassName": flowrun.spec.sandbox.runtime_class_name}  # gVisor, Kata: sandbox pods only
           if sandbox and flowrun.spec.sandbox.runtime_class_name else {}),
        # A group member's stable DNS name: <pod>.<group Service>.<namespace>.svc.
        **({"hostname": child_name(graph.run, component.name), "subdomain": child_name(graph.run, component.group)}
           if component.group else {}),
    }
    template = flowrun.spec.pod_template
    labels = template.labels | component_labels(graph.run, component)  # the operator's own labels win
    annotations = dict(template.annotations)
    if KUEUE_QUEUE_LABEL in template.labels:  # one Kueue workload per group epoch: a restart queues anew
        labels[KUEUE_POD_GROUP_LABEL] = kueue_pod_group(graph.run, epoch)
        annotations[KUEUE_POD_GROUP_COUNT] = str(len(graph.components))
    spec_hash = content_hash(pod_spec, labels, annotations, config_text)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": object_meta(child_name(graph.run, component.name), owner,
                          labels | {LABEL_EPOCH: str(epoch)}, annotations | {ANNOTATION_HASH: spec_hash}),
        "spec": pod_spec,
    }


def kueue_pod_group(run: str, epoch: int) -> str:
    return f"{run}-{epoch}"


__all__ = [
    "ANNOTATION_HASH", "ENV_GRPC_TOKEN", "LABEL_EPOCH", "LABEL_FLOWRUN", "LABEL_FLOWSERVICE", "Owner",
    "RenderOptions", "RenderedRun", "child_name", "config_map_name", "content_hash", "render_flowrun",
    "render_token_secret",
]
