"""A node agent for the one-machine cluster: runs the Pods stored in an API server as podman containers.

Test infrastructure, not product: flowlane targets real Kubernetes, where the kubelet does this.
Here no kubelet can run, so this agent plays one node's kubelet against the API emulator
(``fixtures_kube``): it lists Pods, starts each as a container built from ``images/``, and writes
real Pod status back (phase, ``containerStatuses`` with exit codes and reasons such as
``OOMKilled``, ``restartCount``, the Pod IP). What the operator renders is what runs.

What it honours, because these are what break first on a real cluster:

- ``image`` (an image missing from the local store is ``ErrImagePull``/``ImagePullBackOff``: no
  registry is reachable), ``command``, ``args``, ``workingDir``, ``env`` (``value``,
  ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` of the pod's name, namespace and IP); a
  missing Secret or ConfigMap key is ``CreateContainerConfigError``.
- volumes: ``configMap`` and ``secret`` (files, read-only), ``emptyDir`` (a directory; with
  ``medium: Memory`` or a ``sizeLimit``, a tmpfs of that size, so a full one fails writes with
  ENOSPC where a kubelet would evict), and a ``persistentVolumeClaim`` as a podman named volume
  that outlives the pod, group-owned by ``fsGroup`` as the kubelet does.
- ``securityContext``: ``runAsUser``/``runAsGroup``/``fsGroup``/``supplementalGroups``,
  ``runAsNonRoot`` (refused for an image that runs as root), ``readOnlyRootFilesystem``,
  ``capabilities``, ``allowPrivilegeEscalation: false`` (no_new_privs) and ``seccompProfile``.
- the memory limit (``--memory``; a kill by it is ``OOMKilled``) and the CPU limit;
  ``restartPolicy`` (``Always``/``OnFailure`` restart in place with a doubling back-off shown as
  ``CrashLoopBackOff``; ``Never`` leaves the pod ``Failed``/``Succeeded``).
- Kubernetes' defaults that bite: a 64 MiB ``/dev/shm``, no service-account token when
  ``automountServiceAccountToken`` is false (a placeholder token otherwise), the terminated
  container's last log line as its message (``terminationMessagePolicy: FallbackToLogsOnError``).
- Deployments (the FlowService gateway): a small controller keeps ``spec.replicas`` pods of the
  current template (named ``<deployment>-<template hash>-<i>``; a new template starts its pods
  before the old ones go, as ``maxUnavailable: 0`` asks) and writes ``replicas``,
  ``readyReplicas``, ``availableReplicas``, ``updatedReplicas`` and ``observedGeneration`` back.
- networking: every pod joins one bridge network; a Service in the pod's namespace whose selector
  matches the pod becomes DNS aliases ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc`` and
  ``<svc>.<ns>.svc.cluster.local`` for it (headless Services, as flowlane renders them); a pod
  with ``hostname`` and ``subdomain`` (learner pods of one torch world) is also
  ``<hostname>.<those names>`` when the subdomain names such a Service. A pod
  selected by a NetworkPolicy that allows no egress joins only an ``--internal`` network, which
  every other pod also joins: it can be reached but can reach nothing outside.

What it does not model: scheduling and node pressure (every pod lands on this one node at once),
resource requests, probes, init and sidecar containers (one container per pod, as flowlane renders
them), ingress rules of NetworkPolicies, graceful-deletion bookkeeping (a deleted pod's container
gets ``terminationGracePeriodSeconds`` to stop, then is removed), image pulls and ``kubectl
logs``/``exec`` through the API (use ``podman logs``/``podman exec`` on the container, named
``k8s_<namespace>_<pod>_<uid prefix>`` and labelled ``dev.flowlane.node-agent.pod=<namespace>/<pod>``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("flowlane.node-agent")

PODMAN = os.environ.get("FLOWLANE_PODMAN", "podman")
LABEL = "dev.flowlane.node-agent"
SHM_SIZE = "64m"
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 20.0
#: Any image with `sleep`: the base image every flowlane image is built on.
PAUSE_IMAGE = os.environ.get("FLOWLANE_PAUSE_IMAGE", "docker.io/library/python:3.11.13-slim-bookworm")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}...: {result.stderr.strip() or result.stdout.strip()}")
    return result


def quantity_bytes(text: str) -> int:
    """A Kubernetes quantity (``64Mi``, ``1G``, ``500``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text).strip())
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"not a quantity: {text!r}")
    return int(float(match.group(1)) * units.get(match.group(2), 1))


def quantity_cpus(text: str) -> float:
    value = str(text).strip()
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


class PodConfigError(Exception):
    """The pod cannot be started as specified (CreateContainerConfigError)."""


@dataclass
class PodState:
    """What the agent knows of one pod it runs (keyed by the pod's uid)."""

    namespace: str
    name: str
    uid: str
    container: str
    restart_policy: str
    workdir: Path
    started: bool = False
    restart_count: int = 0
    backoff_until: float = 0.0
    waiting: tuple[str, str] | None = None  # (reason, message) while not running
    last_terminated: dict[str, Any] | None = None
    start_time: str = field(default_factory=now_rfc3339)
    last_status: dict[str, Any] | None = None


class NodeAgent:
    """Runs the API server's Pods (in ``namespaces``, or all) as containers on ``network``."""

    def __init__(self, server: str, *, network: str, namespaces: list[str] | None = None,
                 workdir: Path | None = None, token: str | None = None, interval_s: float = 0.5,
                 node_name: str = "flowlane-node-0") -> None:
        self.server = server.rstrip("/")
        self.network = network
        self.internal_network = f"{network}-internal"
        self.namespaces = namespaces
        self.workdir = workdir or Path("/var/tmp/flowlane-node")
        self.interval_s = interval_s
        self.node_name = node_name
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, timeout=15, headers=headers)
        self.pods: dict[str, PodState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def ensure_networks(self) -> None:
        """The pods' networks, and a node pause container on both that keeps their bridges up.

        netavark creates a network's bridge (and its gateway address on this host, where the API
        server and storage listen) only while a container is attached.
        """
        for name, internal in ((self.network, False), (self.internal_network, True)):
            if podman("network", "exists", name, check=False).returncode != 0:
                podman("network", "create", *(["--internal"] if internal else []), name)
        pause = f"{self.network}-pause"
        state = podman("inspect", "--format", "{{.State.Running}}", pause, check=False)
        if state.stdout.strip() != "true":
            podman("rm", "--force", pause, check=False)
            podman("run", "--detach", "--name", pause, "--label", f"{LABEL}=1", "--network", self.network,
                   "--network", self.internal_network, "--read-only", "--cap-drop", "all", PAUSE_IMAGE,
                   "sleep", "infinity")

    def remove_networks(self) -> None:
        podman("rm", "--force", "--time", "0", f"{self.network}-pause", check=False)
        for name in (self.network, self.internal_network):
            podman("network", "rm", "--force", name, check=False)

    def start(self) -> NodeAgent:
        self.ensure_networks()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self.run_forever, name="node-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self, remove_containers: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        if remove_containers:
            for state in list(self.pods.values()):
                self._remove(state, grace_s=2)
        self.http.close()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # keep the node up; the next pass retries
                logger.exception("node agent pass failed")
                self.errors.append(repr(exc))
            self._stop.wait(self.interval_s)

    # -- API --------------------------------------------------------------------------------------

    def _list(self, path: str, namespace: str | None) -> list[dict[str, Any]]:
        base, _, plural = path.rpartition("/")
        url = f"{base}/namespaces/{namespace}/{plural}" if namespace else path
        response = self.http.get(url)
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json().get("items", [])
        return [i for i in items if namespace is None or i.get("metadata", {}).get("namespace") == namespace]

    def _list_all(self, path: str) -> list[dict[str, Any]]:
        if not self.namespaces:
            return self._list(path, None)
        return [item for ns in self.namespaces for item in self._list(path, ns)]

    def _get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def _patch_status(self, state: PodState, status: dict[str, Any]) -> None:
        response = self.http.patch(f"/api/v1/namespaces/{state.namespace}/pods/{state.name}/status",
                                   json={"status": status},
                                   headers={"Content-Type": "application/merge-patch+json"})
        if response.status_code != 404:
            response.raise_for_status()

    # -- one pass ---------------------------------------------------------------------------------

    def sync_once(self) -> None:
        pods = self._list_all("/api/v1/pods")
        services = self._list_all("/api/v1/services")
        policies = self._list_all("/apis/networking.k8s.io/v1/networkpolicies")
        seen = {_uid(pod) for pod in pods}
        # Deleted from the API first: a replacement under the same name must not lose its container.
        for uid in set(self.pods) - seen:
            state = self.pods.pop(uid)
            logger.info("pod %s/%s deleted: removing its container", state.namespace, state.name)
            self._remove(state, grace_s=5)
        for pod in pods:
            if pod.get("metadata", {}).get("deletionTimestamp"):
                continue
            uid = _uid(pod)
            known = self.pods.get(uid)
            self._step(known if known is not None else self._admit(pod, uid), pod, services, policies)
        self._sync_deployments(pods)

    def _sync_deployments(self, pods: list[dict[str, Any]]) -> None:
        """The Deployment controller's part: pods of the current template, then the status."""
        for deployment in self._list_all("/apis/apps/v1/deployments"):
            meta = deployment["metadata"]
            spec = deployment.get("spec") or {}
            template = spec.get("template") or {}
            digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            owned = [p for p in pods if p["metadata"].get("namespace") == meta["namespace"]
                     and any(ref.get("uid") == meta.get("uid") for ref in p["metadata"].get("ownerReferences") or [])]
            current = [p for p in owned if p["metadata"].get("labels", {}).get("pod-template-hash") == digest]
            replicas = int(spec.get("replicas", 1))
            names = {p["metadata"]["name"] for p in current}
            for index in range(replicas):
                name = f"{meta['name']}-{digest}-{index}"
                if name not in names:
                    self._create_pod(deployment, template, name, digest)
            ready = [p for p in current if (p.get("status") or {}).get("phase") == "Running"
                     and all(c.get("ready") for c in (p.get("status") or {}).get("containerStatuses") or [{}])]
            if len(ready) >= replicas:  # the new template serves: old pods go
                for pod in owned:
                    if pod not in current:
                        self.http.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{pod['metadata']['name']}")
            status = {"observedGeneration": meta.get("generation", 1), "replicas": len(owned),
                      "updatedReplicas": len(current), "readyReplicas": len(ready), "availableReplicas": len(ready)}
            if {k: (deployment.get("status") or {}).get(k) for k in status} != status:
                self.http.patch(f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}/status",
                                json={"status": status}, headers={"Content-Type": "application/merge-patch+json"})

    def _create_pod(self, deployment: Mapping[str, Any], template: Mapping[str, Any], name: str, digest: str) -> None:
        meta = deployment["metadata"]
        pod_meta = dict(template.get("metadata") or {})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {**pod_meta, "name": name, "namespace": meta["namespace"],
                            "labels": {**(pod_meta.get("labels") or {}), "pod-template-hash": digest},
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                                 "uid": meta.get("uid"), "controller": True}]},
               "spec": template.get("spec") or {}}
        response = self.http.post(f"/api/v1/namespaces/{meta['namespace']}/pods", json=pod)
        if response.status_code not in (200, 201, 409):
            response.raise_for_status()

    def _admit(self, pod: Mapping[str, Any], uid: str) -> PodState:
        meta = pod["metadata"]
        spec = pod.get("spec", {})
        state = PodState(namespace=meta["namespace"], name=meta["name"], uid=uid,
                         container=container_name(meta["namespace"], meta["name"], uid),
                         restart_policy=spec.get("restartPolicy", "Always"),
                         workdir=self.workdir / uid.replace("/", "_"))
        self.pods[uid] = state
        # A container of this pod object left by an earlier agent goes.
        podman("rm", "--force", "--time", "2", state.container, check=False)
        return state

    def _step(self, state: PodState, pod: Mapping[str, Any], services: list[dict[str, Any]],
              policies: list[dict[str, Any]]) -> None:
        spec = pod.get("spec", {})
        container_spec = (spec.get("containers") or [{}])[0]
        if not state.started:
            image = container_spec.get("image", "")
            if podman("image", "exists", image, check=False).returncode != 0:
                pulling = state.waiting is not None and state.waiting[0] in ("ErrImagePull", "ImagePullBackOff")
                reason = "ImagePullBackOff" if pulling else "ErrImagePull"
                state.waiting = (reason, f'Back-off pulling image "{image}": not in this node\'s image store '
                                         "and no registry is reachable (build it with scripts/build-images.sh)")
            else:
                try:
                    self._create(state, pod, services, policies)
                    podman("start", state.container)
                    state.started = True
                    state.waiting = None
                except PodConfigError as exc:
                    state.waiting = ("CreateContainerConfigError", str(exc))
                except RuntimeError as exc:
                    state.waiting = ("CreateContainerError", str(exc))
        else:
            self._watch_container(state)
        self._report(state, pod, container_spec)

    def _watch_container(self, state: PodState) -> None:
        info = self._inspect(state.container)
        if info is None:
            return
        st = info.get("State", {})
        if st.get("Running") or st.get("Status") in ("running", "created", "configured"):
            return
        if state.backoff_until and time.monotonic() < state.backoff_until:
            return
        if state.backoff_until:  # back-off over: start it again
            state.backoff_until = 0.0
            state.restart_count += 1
            state.waiting = None
            podman("start", state.container, check=False)
            return
        exit_code = int(st.get("ExitCode", 0))
        terminated = {"exitCode": exit_code,
                      "reason": "OOMKilled" if st.get("OOMKilled") else ("Completed" if exit_code == 0 else "Error"),
                      "startedAt": _podman_time(st.get("StartedAt")), "finishedAt": _podman_time(st.get("FinishedAt")),
                      "containerID": f"podman://{info.get('Id', '')}"}
        if exit_code != 0:
            last_line = self._last_log_line(state.container)
            if last_line:
                terminated["message"] = last_line
        restart = state.restart_policy == "Always" or (state.restart_policy == "OnFailure" and exit_code != 0)
        if state.last_terminated is None or state.last_terminated.get("finishedAt") != terminated["finishedAt"]:
            state.last_terminated = terminated
            if restart:
                delay = min(BACKOFF_BASE_S * 2 ** state.restart_count, BACKOFF_CAP_S)
                state.backoff_until = time.monotonic() + delay
                state.waiting = ("CrashLoopBackOff",
                                 f"back-off {delay:.0f}s restarting failed container={state.name} pod={state.name}")

    def _inspect(self, container: str) -> dict[str, Any] | None:
        result = podman("inspect", "--type", "container", container, check=False)
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout or "[]")
        return data[0] if data else None

    def _last_log_line(self, container: str) -> str:
        result = podman("logs", "--tail", "20", container, check=False)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        return lines[-1][:1024] if lines else ""

    # -- status -----------------------------------------------------------------------------------

    def _report(self, state: PodState, pod: Mapping[str, Any], container_spec: Mapping[str, Any]) -> None:
        info = self._inspect(state.container) if state.started else None
        st = (info or {}).get("State", {})
        running = bool(st.get("Running"))
        cstatus: dict[str, Any] = {"name": container_spec.get("name", "main"), "image": container_spec.get("image"),
                                   "restartCount": state.restart_count, "ready": running, "started": running}
        if info:
            cstatus["containerID"] = f"podman://{info.get('Id', '')}"
        if state.waiting:
            cstatus["state"] = {"waiting": {"reason": state.waiting[0], "message": state.waiting[1]}}
        elif running:
            cstatus["state"] = {"running": {"startedAt": _podman_time(st.get("StartedAt"))}}
        elif state.last_terminated:
            cstatus["state"] = {"terminated": state.last_terminated}
        else:
            cstatus["state"] = {"waiting": {"reason": "ContainerCreating"}}
        if state.last_terminated and "terminated" not in cstatus["state"]:
            cstatus["lastState"] = {"terminated": state.last_terminated}
        phase = "Pending"
        if state.started:
            phase = "Running"
            if not running and state.last_terminated and not state.backoff_until and not state.waiting:
                phase = "Succeeded" if state.last_terminated["exitCode"] == 0 else "Failed"
        ip = ""
        for net in ((info or {}).get("NetworkSettings", {}).get("Networks") or {}).values():
            ip = ip or net.get("IPAddress", "")
        status: dict[str, Any] = {
            "phase": phase, "hostIP": "127.0.0.1", "startTime": state.start_time,
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "True" if running else "False"}],
            "containerStatuses": [cstatus],
        }
        if ip:
            status["podIP"] = ip
        comparable = json.dumps(status, sort_keys=True)
        if state.last_status is None or json.dumps(state.last_status, sort_keys=True) != comparable:
            self._patch_status(state, status)
            state.last_status = json.loads(comparable)

    # -- container creation -----------------------------------------------------------------------

    def _secret_or_config(self, namespace: str, kind: str, name: str) -> dict[str, str]:
        path = f"/api/v1/namespaces/{namespace}/{'secrets' if kind == 'secret' else 'configmaps'}/{name}"
        obj = self._get(path)
        if obj is None:
            raise PodConfigError(f'{kind} "{name}" not found')
        values: dict[str, str] = {}
        if kind == "secret":
            for key, encoded in (obj.get("data") or {}).items():
                values[key] = base64.b64decode(encoded).decode()
            values.update({k: str(v) for k, v in (obj.get("stringData") or {}).items()})
        else:
            values.update({k: str(v) for k, v in (obj.get("data") or {}).items()})
        return values

    def _env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                                   str(item["value"]))
                continue
            source = item.get("valueFrom") or {}
            for kind, key_ref in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
                ref = source.get(key_ref)
                if ref:
                    values = self._secret_or_config(namespace, kind, ref["name"])
                    if ref["key"] not in values:
                        if ref.get("optional"):
                            break
                        raise PodConfigError(f'couldn\'t find key {ref["key"]} in {kind} {namespace}/{ref["name"]}')
                    env[name] = values[ref["key"]]
            field_ref = (source.get("fieldRef") or {}).get("fieldPath")
            if field_ref:
                env[name] = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": namespace,
                             "spec.nodeName": self.node_name}.get(field_ref, "")
        return env

    def _image_user(self, image: str) -> str:
        result = podman("image", "inspect", "--format", "{{.Config.User}}", image, check=False)
        return result.stdout.strip()

    def _create(self, state: PodState, pod: Mapping[str, Any], services: list[dict[str, Any]],
                policies: list[dict[str, Any]]) -> None:
        spec = pod.get("spec", {})
        meta = pod["metadata"]
        container = (spec.get("containers") or [{}])[0]
        image = container["image"]
        if state.workdir.exists():
            shutil.rmtree(state.workdir)
        state.workdir.mkdir(parents=True)
        args: list[str] = ["create", "--name", state.container, "--label", f"{LABEL}=1",
                           "--label", f"{LABEL}.pod={meta['namespace']}/{meta['name']}",
                           "--hostname", meta["name"][:63], "--shm-size", SHM_SIZE]

        # Security context: the container's fields win over the pod's, as in Kubernetes.
        pod_sc = spec.get("securityContext") or {}
        sc = {**pod_sc, **(container.get("securityContext") or {})}
        user = sc.get("runAsUser")
        group = sc.get("runAsGroup")
        if sc.get("runAsNonRoot") and user is None:
            image_user = self._image_user(image).split(":")[0]
            if image_user in ("", "0", "root"):
                raise PodConfigError("container has runAsNonRoot and image will run as root")
            if not image_user.isdigit():
                raise PodConfigError(f"container has runAsNonRoot and image has non-numeric user ({image_user}), "
                                     "cannot verify user is non-root")
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        elif group is not None:
            image_user = self._image_user(image).split(":")[0] or "0"
            args += ["--user", f"{image_user}:{group}"]
        fs_group = pod_sc.get("fsGroup")
        for extra in [*([fs_group] if fs_group is not None else []), *(pod_sc.get("supplementalGroups") or [])]:
            args += ["--group-add", str(extra)]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            args += ["--cap-drop", cap.lower() if cap.upper() == "ALL" else cap]
        for cap in caps.get("add") or []:
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        if sc.get("privileged"):
            args += ["--privileged"]

        limits = (container.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            args += ["--memory", str(quantity_bytes(limits["memory"])), "--memory-swap",
                     str(quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", f"{quantity_cpus(limits['cpu']):g}"]

        # Networks: the internal one for pods whose egress is denied, both for the rest.
        aliases = [alias for svc in services if _selects(svc, pod)
                   for alias in _service_aliases(svc)]
        hostname, subdomain = (pod.get("spec") or {}).get("hostname"), (pod.get("spec") or {}).get("subdomain")
        if hostname and subdomain:  # the pod's own DNS name under its headless Service
            aliases += [f"{hostname}.{alias}" for svc in services
                        if _selects(svc, pod) and svc["metadata"]["name"] == subdomain
                        for alias in _service_aliases(svc)]
        denied = any(_denies_egress(policy, pod) for policy in policies)
        networks = [self.internal_network] if denied else [self.network, self.internal_network]
        for net in networks:
            args += ["--network", net]
        for alias in aliases:
            args += ["--network-alias", alias]

        env = self._env(pod, container)
        env.setdefault("HOSTNAME", meta["name"])
        env_file = state.workdir / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if "\n" not in v))
        for key, value in env.items():
            if "\n" in value:
                args += ["--env", f"{key}={value}"]
        args += ["--env-file", str(env_file)]

        args += self._volumes(state, pod, container)
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        command = container.get("command")
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args.append(image)
        args += [str(a) for a in container.get("args") or []]
        podman(*args)

    def _volumes(self, state: PodState, pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
        spec = pod.get("spec", {})
        namespace = pod["metadata"]["namespace"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        by_name = {v["name"]: v for v in spec.get("volumes") or []}
        args: list[str] = []
        for mount in container.get("volumeMounts") or []:
            volume = by_name.get(mount["name"])
            if volume is None:
                raise PodConfigError(f'volumeMount {mount["name"]} names no volume of the pod')
            target = mount["mountPath"]
            ro = ",ro" if mount.get("readOnly") else ""
            if "configMap" in volume or "secret" in volume:
                kind = "configmap" if "configMap" in volume else "secret"
                source = volume.get("configMap") or volume.get("secret") or {}
                name = str(source.get("name") or source.get("secretName") or "")
                values = self._secret_or_config(namespace, kind, name)
                items = source.get("items") or [{"key": k, "path": k} for k in values]
                folder = state.workdir / "volumes" / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                mode = source.get("defaultMode", 0o644)
                for item in items:
                    if item["key"] not in values:
                        raise PodConfigError(f'configmap/secret {name} has no key {item["key"]}')
                    path = folder / item["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(values[item["key"]])
                    path.chmod(item.get("mode", mode))
                    if fs_group is not None:
                        os.chown(path, 0, int(fs_group))
                sub = mount.get("subPath")
                src = folder / sub if sub else folder
                args += ["--volume", f"{src}:{target}:ro"]
            elif "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory" or empty.get("sizeLimit"):
                    size = f",tmpfs-size={quantity_bytes(empty['sizeLimit'])}" if empty.get("sizeLimit") else ""
                    args += ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777{size}"]
                else:
                    folder = state.workdir / "volumes" / mount["name"]
                    folder.mkdir(parents=True, exist_ok=True)
                    folder.chmod(0o1777)
                    args += ["--volume", f"{folder}:{target}{ro}"]
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                volume_name = f"pvc-{namespace}-{claim}"
                if podman("volume", "exists", volume_name, check=False).returncode != 0:
                    podman("volume", "create", volume_name)
                inspect = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume_name)
                mountpoint = Path(inspect.stdout.strip())
                if fs_group is not None:  # the kubelet makes the volume group-owned and setgid
                    os.chown(mountpoint, 0, int(fs_group))
                    mountpoint.chmod(0o2775)
                args += ["--volume", f"{volume_name}:{target}{ro}"]
            elif "hostPath" in volume:
                raise PodConfigError("hostPath volumes are not offered by this node")
            else:
                raise PodConfigError(f'volume {mount["name"]}: this node does not support its type')
        if spec.get("automountServiceAccountToken", True) is not False:
            folder = state.workdir / "serviceaccount"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "token").write_text("node-agent-placeholder-token")
            (folder / "namespace").write_text(namespace)
            for item in folder.iterdir():
                item.chmod(0o644)
            args += ["--volume", f"{folder}:/var/run/secrets/kubernetes.io/serviceaccount:ro"]
        return args

    def _remove(self, state: PodState, grace_s: int) -> None:
        podman("stop", "--time", str(grace_s), state.container, check=False, timeout=grace_s + 60)
        # A kubelet keeps a gone pod's logs for a while; here they stay in the node's log folder.
        logs = podman("logs", state.container, check=False)
        if logs.stdout or logs.stderr:
            folder = self.workdir / "logs"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{state.container}.log").write_text(logs.stdout + logs.stderr)
        podman("rm", "--force", "--time", "0", state.container, check=False, timeout=60)
        shutil.rmtree(state.workdir, ignore_errors=True)

    def saved_logs(self, namespace: str, pod: str) -> str:
        """Logs of the removed containers of every pod object named ``pod``, oldest first."""
        folder = self.workdir / "logs"
        files = sorted(folder.glob(f"k8s_{namespace}_{pod}_*.log"), key=lambda f: f.stat().st_mtime) \
            if folder.is_dir() else []
        return "".join(f.read_text(errors="replace") for f in files)


def _uid(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata", {})
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


def container_name(namespace: str, pod: str, uid: str) -> str:
    """One container per pod object: a pod recreated under its name gets a new container."""
    return f"k8s_{namespace}_{pod}_{uid.replace('/', '_')[:8]}"


def pod_container(namespace: str, pod: str) -> str:
    """The newest container of the pod named ``pod`` (what ``kubectl logs`` would show)."""
    result = podman("ps", "--all", "--filter", f"label={LABEL}.pod={namespace}/{pod}", "--sort", "created",
                    "--format", "{{.Names}}", check=False)
    names = result.stdout.split()
    return names[-1] if names else container_name(namespace, pod, "missing")


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = obj.get("metadata", {}).get("labels") or {}
    return labels


def _matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (``matchLabels`` and ``matchExpressions``) against a pod's labels."""
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _same_namespace(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return bool(a.get("metadata", {}).get("namespace") == b.get("metadata", {}).get("namespace"))


def _selects(service: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    selector = (service.get("spec") or {}).get("selector")
    return _same_namespace(service, pod) and bool(selector) and _matches({"matchLabels": selector}, _labels(pod))


def _service_aliases(service: Mapping[str, Any]) -> list[str]:
    name = service["metadata"]["name"]
    namespace = service["metadata"]["namespace"]
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]


def _denies_egress(policy: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    spec = policy.get("spec") or {}
    if not _same_namespace(policy, pod) or not _matches(spec.get("podSelector") or {}, _labels(pod)):
        return False
    return "Egress" in (spec.get("policyTypes") or []) and not spec.get("egress")


def _podman_time(value: Any) -> str:
    """podman's ``2026-12-01 09:30:00.123 +0000 UTC`` (or RFC 3339) as RFC 3339 seconds."""
    text = str(value or "")
    match = re.match(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})", text)
    return f"{match.group(1)}T{match.group(2)}Z" if match else now_rfc3339()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an API server's Pods as podman containers (one node).")
    parser.add_argument("--server", required=True, help="API server URL, e.g. http://10.89.0.1:6443")
    parser.add_argument("--network", default="flowlane-cluster", help="podman network for the pods")
    parser.add_argument("--namespace", "-n", action="append", help="namespaces to serve (default: all)")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(levelname)s %(message)s")
    agent = NodeAgent(args.server, network=args.network, namespaces=args.namespace, token=args.token)
    agent.ensure_networks()
    agent.workdir.mkdir(parents=True, exist_ok=True)
    try:
        agent.run_forever()
    except KeyboardInterrupt:
        agent.stop()


if __name__ == "__main__":
    main()
