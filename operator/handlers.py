"""The kopf operator: the thin shell that reads, plans (``reconcile.py``) and applies.

kopf delivers the triggers: a FlowRun or FlowService created, resumed after an operator restart or
edited; a periodic timer; any change to a pod or Deployment flowlane owns. Each trigger becomes a
reconcile of the owning resource, serialised per resource by a lock; triggers that arrive while a
reconcile is already waiting are folded into it, so a burst of pod events costs one reconcile.

A reconcile reads the resource, its children, the Secrets it references and, while the learner
runs, its progress from a ``ProgressSource`` (by default the learner's ``GetStatus`` gRPC call;
tests feed their own). ``plan_flowrun`` decides; ``Reconciler._apply`` writes the status, then
deletes, updates and creates children, then posts events. API errors in a kopf handler become
``kopf.TemporaryError`` so kopf retries with a delay; nothing a user writes can crash the operator.

**Cheap reconciles.** Hundreds of runs must not cost the API server hundreds of requests a
second. The operator's watches carry server-side label selectors (only flowlane's children reach
it), and kopf indexes fed by those watches hold every FlowRun, FlowService and child, so a
reconcile reads them from memory, not with LIST and GET calls. A resource read from an index is
trusted once the watch has delivered the operator's own last write to it (its resourceVersion);
until then it is read with one GET, so a reconcile never acts on a status older than the one it
wrote. Referenced Secrets are checked only while pods remain to be created, the learner's token
is read once per run, and timers stop for finished runs. A Running run then costs its status
patch per interval (when progress changed) and nothing else; a finished one costs nothing.

The API client is a small aiohttp one (kopf keeps its own private), logged in with the same
credentials kopf uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import aiohttp
import kopf

from flowlane import __version__
from flowlane.api.common import InvalidResourceError, utcnow, validate_resource
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import PLURAL as FLOWRUN_PLURAL
from flowlane.api.flowrun import FlowRun, Phase
from flowlane.api.flowservice import KIND as FLOWSERVICE_KIND
from flowlane.api.flowservice import PLURAL as FLOWSERVICE_PLURAL
from flowlane.operator.graph import POD_CONFIG_PATH, compile_graph
from flowlane.operator.reconcile import (
    Event,
    Plan,
    Progress,
    ProgressSource,
    RunChildren,
    RunRef,
    ServiceChildren,
    apply_cluster_defaults,
    flowrun_object,
    merge_patch,
    object_name,
    plan_flowrun,
    plan_flowservice,
    pod_node,
    pod_phase,
    pod_stuck_terminating,
    pod_terminating,
    referenced_secrets,
    status_patch,
)
from flowlane.operator.render import (
    LABEL_FLOWRUN,
    LABEL_FLOWSERVICE,
    LABEL_MANAGED_BY,
    LABEL_MEMBER,
    MANAGED_BY,
    child_name,
    kubernetes_address,
    render_token_secret,
)
from flowlane.operator.settings import ClusterDefaults, OperatorConfig, OperatorMetrics, connection, kopf_settings

logger = logging.getLogger("flowlane.operator")

# ================================================================================================
# The Kubernetes API, as little of it as the operator needs
# ================================================================================================


@dataclass(frozen=True)
class Kind:
    """An API resource: where its objects live in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    def cluster_path(self, name: str) -> str:
        """The path of a cluster-scoped object (a Node)."""
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/{self.plural}/{name}"


PODS = Kind("", "v1", "pods")
SERVICES = Kind("", "v1", "services")
CONFIG_MAPS = Kind("", "v1", "configmaps")
SECRETS = Kind("", "v1", "secrets")
NETWORK_POLICIES = Kind("networking.k8s.io", "v1", "networkpolicies")
DEPLOYMENTS = Kind("apps", "v1", "deployments")
DISRUPTION_BUDGETS = Kind("policy", "v1", "poddisruptionbudgets")
NODES = Kind("", "v1", "nodes")  # cluster-scoped
FLOWRUNS = Kind("flowlane.dev", "v1alpha1", FLOWRUN_PLURAL)
FLOWSERVICES = Kind("flowlane.dev", "v1alpha1", FLOWSERVICE_PLURAL)
KINDS_BY_OBJECT = {("v1", "Pod"): PODS, ("v1", "Service"): SERVICES, ("v1", "ConfigMap"): CONFIG_MAPS,
                   ("v1", "Secret"): SECRETS, ("networking.k8s.io/v1", "NetworkPolicy"): NETWORK_POLICIES,
                   ("apps/v1", "Deployment"): DEPLOYMENTS, ("policy/v1", "PodDisruptionBudget"): DISRUPTION_BUDGETS}


def kind_of(obj: Mapping[str, Any]) -> Kind:
    return KINDS_BY_OBJECT[(obj["apiVersion"], obj["kind"])]


USER_AGENT = "flowlane-operator"
FINISHED_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)
#: How long a deleted child is not deleted again while the watch still shows it.
DELETE_MEMORY_S = 30.0


class ApiError(Exception):
    """A Kubernetes API call that failed with a status other than the ones callers expect."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


#: Answers to a create that mean "not this object, not now" (a ResourceQuota, an admission webhook,
#: a policy engine): they go to the resource's status, not into kopf's retry loop.
REJECTION_STATUSES = frozenset({400, 403, 422})


class KubeClient:
    """A small async Kubernetes REST client on aiohttp (kopf keeps its own client private).

    Credentials come from the same ``kopf.ConnectionInfo`` kopf logs in with. A bound
    service-account token expires (the kubelet rotates its file): on a 401 the client logs in
    again through ``relogin`` (which reads the token anew) and retries once. Lists filter by label
    on the client too, so the client behaves the same against API emulators that ignore label
    selectors.
    """

    def __init__(self, info: kopf.ConnectionInfo | None = None,
                 relogin: Callable[[], kopf.ConnectionInfo | None] | None = None) -> None:
        self._info = info
        self.relogin = relogin
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        self._tempfiles: list[Any] = []

    def connect(self, info: kopf.ConnectionInfo) -> None:
        self._info = info

    def _make_ssl(self, info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
        if info.insecure:
            return False
        ctx = ssl.create_default_context(cafile=str(info.ca_path) if info.ca_path else None,
                                         cadata=_text(info.ca_data) if info.ca_data else None)
        cert, key = info.certificate_path, info.private_key_path
        if info.certificate_data:
            cert = self._tempfile(info.certificate_data)
        if info.private_key_data:
            key = self._tempfile(info.private_key_data)
        if cert:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        return ctx

    def _tempfile(self, data: str | bytes) -> str:
        handle = tempfile.NamedTemporaryFile(prefix="flowlane-kube-", delete=True)  # noqa: SIM115
        raw = data.encode() if isinstance(data, str) else data
        with contextlib.suppress(ValueError):
            raw = base64.b64decode(raw, validate=True)
        handle.write(raw)
        handle.flush()
        self._tempfiles.append(handle)
        return handle.name

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._info is None:
                raise RuntimeError("KubeClient used before login: no API server connection configured")
            # The API server's audit log (and the test emulator's request counts) tell clients apart by it.
            headers = {"Accept": "application/json", "User-Agent": f"{USER_AGENT}/{__version__}"}
            if self._info.token:
                headers["Authorization"] = f"{self._info.scheme or 'Bearer'} {self._info.token}"
            self._ssl = self._make_ssl(self._info) if self._info.server.startswith("https") else True
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/"), headers=headers,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def _request(self, method: str, path: str, *, ok: Iterable[int] = (), **kwargs: Any) -> tuple[int, Any]:
        status, data, text = await self._send(method, path, **kwargs)
        if status == 401 and await self._fresh_credentials():
            status, data, text = await self._send(method, path, **kwargs)
        if status >= 400 and status not in ok:
            message = data.get("message", text) if isinstance(data, dict) else str(text)
            raise ApiError(status, method, path, str(message)[:300])
        return status, data

    async def _send(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, str]:
        session = await self._http()
        async with session.request(method, path, ssl=self._ssl, **kwargs) as response:
            text = await response.text()
            data = json.loads(text) if text and text.lstrip().startswith(("{", "[")) else text
            return response.status, data, text

    async def _fresh_credentials(self) -> bool:
        """Log in again (a rotated token file, a renewed kubeconfig); False when nothing changed."""
        info = self.relogin() if self.relogin is not None else None
        if info is None or (self._info is not None and info.token == self._info.token
                            and info.certificate_data == self._info.certificate_data):
            return False
        logger.info("the API server refused the operator's credentials (401): logged in again")
        self._info = info
        if self._session is not None:
            await self._session.close()
            self._session = None
        return True

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        status, data = await self._request("GET", kind.path(namespace, name), ok=(404,))
        return None if status == 404 else data

    async def list(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        _, data = await self._request("GET", kind.path(namespace), params={"labelSelector": selector})
        items = data.get("items", []) if isinstance(data, dict) else []
        return [i for i in items if all(i.get("metadata", {}).get("labels", {}).get(k) == v
                                        for k, v in labels.items())]

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create ``obj``; False when an object of that name already exists."""
        meta = obj["metadata"]
        status, _ = await self._request("POST", kind_of(obj).path(meta["namespace"]), json=obj, ok=(409,))
        return status != 409

    async def patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None) -> dict[str, Any] | None:
        """JSON-merge-patch an object; its new state, or None when it does not exist."""
        status, data = await self._request(
            "PATCH", kind.path(namespace, name, subresource), data=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"}, ok=(404,),
        )
        return None if status == 404 else (data if isinstance(data, dict) else {})

    async def delete(self, kind: Kind, namespace: str, name: str, grace_period_s: int | None = None) -> bool:
        """Delete an object (background propagation; ``grace_period_s=0`` forces it); False when already gone."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        status, _ = await self._request("DELETE", kind.path(namespace, name), ok=(404,), json=options)
        return status != 404

    async def node_lost(self, name: str) -> bool:
        """Whether a Node is gone or not Ready; False when the operator may not read Nodes."""
        status, data = await self._request("GET", NODES.cluster_path(name), ok=(403, 404))
        if status == 403:
            logger.info("may not read node %s (RBAC): pods stuck Terminating on it are not force-deleted", name)
            return False
        if status == 404:
            return True
        conditions = ((data or {}).get("status") or {}).get("conditions") or [] if isinstance(data, dict) else []
        return not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        for handle in self._tempfiles:
            handle.close()
        self._tempfiles.clear()


def _text(data: str | bytes) -> str:
    raw = data if isinstance(data, bytes) else data.encode()
    with contextlib.suppress(ValueError):
        raw = base64.b64decode(raw, validate=True)
    return raw.decode()



# ================================================================================================
# Progress from the learner
# ================================================================================================


class GrpcProgressSource:
    """Asks the learner's ``GetStatus`` RPC, with the run's token read from its Secret."""

    def __init__(self, client: KubeClient, timeout_s: float = 3.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        # One Secret read per run, not one per interval; dropped when the learner refuses it.
        self._tokens: dict[tuple[str, str, str], str] = {}

    async def token(self, run: RunRef) -> str | None:
        key = (run.namespace, run.token.secret, run.token.key)
        if key not in self._tokens:
            token = await self._read_token(run)
            if not token:
                return None
            self._tokens[key] = token
        return self._tokens[key]

    async def _read_token(self, run: RunRef) -> str | None:
        secret = await self.client.get(SECRETS, run.namespace, run.token.secret) or {}
        if run.token.key in (secret.get("stringData") or {}):  # not yet converted (emulators)
            return str(secret["stringData"][run.token.key]).strip()
        encoded = (secret.get("data") or {}).get(run.token.key)
        return base64.b64decode(encoded).decode().strip() if encoded else None

    async def __call__(self, run: RunRef) -> Progress | None:
        try:
            import grpc.aio

            from flowlane.api import learner_pb2, learner_pb2_grpc
            from flowlane.runtime.grpc_common import open_channel
        except ImportError:  # a build without the gRPC stubs: no progress, the run goes on
            return None
        token = await self.token(run)
        if not token:
            return None
        async with open_channel(run.learner_address, token) as channel:
            try:
                status = await learner_pb2_grpc.LearnerStub(channel).GetStatus(
                    learner_pb2.StatusRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                logger.info("learner %s: GetStatus failed: %s", run.learner_address, exc.code())
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self._tokens.pop((run.namespace, run.token.secret, run.token.key), None)
                return None
        if status.phase == Phase.PENDING.value:
            # Still starting: a restarted learner serves before it has restored its checkpoint,
            # and its step 0 would make the run's status count backwards.
            return None
        return Progress(
            step=status.step, total_steps=status.total_steps or None, policy_version=status.policy_version,
            reward=status.reward_mean,
            held_out_accuracy=status.held_out_accuracy if status.HasField("held_out_accuracy") else None,
            baseline_accuracy=status.baseline_accuracy if status.HasField("baseline_accuracy") else None,
            last_checkpoint=status.last_checkpoint or None, mlflow_run_id=status.mlflow_run_id or None,
            finished=status.phase == Phase.SUCCEEDED.value,
        )


# ================================================================================================
# What the watches hold
# ================================================================================================

#: The kopf indexes the operator keeps: name -> (resource, the label whose value is the owner's
#: name). Each maps (namespace, owner name) to the objects of that kind that the owner has.
CHILD_INDEXES: dict[str, tuple[Kind, str]] = {
    "flowlane_run_pods": (PODS, LABEL_FLOWRUN),
    "flowlane_run_services": (SERVICES, LABEL_FLOWRUN),
    "flowlane_run_config_maps": (CONFIG_MAPS, LABEL_FLOWRUN),
    "flowlane_run_network_policies": (NETWORK_POLICIES, LABEL_FLOWRUN),
    "flowlane_run_disruption_budgets": (DISRUPTION_BUDGETS, LABEL_FLOWRUN),
    "flowlane_service_deployments": (DEPLOYMENTS, LABEL_FLOWSERVICE),
    "flowlane_service_services": (SERVICES, LABEL_FLOWSERVICE),
}
#: Indexes of the resources themselves: (namespace, name) -> the object.
RESOURCE_INDEXES: dict[str, Kind] = {"flowlane_flowruns": FLOWRUNS, "flowlane_flowservices": FLOWSERVICES}


class WatchCache:
    """The objects kopf's indexes hold, fed by the operator's watches (kopf fills every index
    from its watch's initial list before it calls any other handler, so an index is never partial).

    ``written`` records the resourceVersion of the operator's own last write to a resource; the
    index copy of that resource is trusted again once the watch has delivered that version.
    """

    def __init__(self, indexes: Mapping[str, Any]) -> None:
        self.indexes = {name: indexes[name] for name in (*CHILD_INDEXES, *RESOURCE_INDEXES) if name in indexes}
        self.written: dict[tuple[str, str, str], str] = {}

    def children(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]] | None:
        """The children of the owner that ``labels`` names (one owner label), or None when not indexed."""
        for name, (index_kind, label) in CHILD_INDEXES.items():
            if index_kind == kind and set(labels) == {label} and name in self.indexes:
                return list(self.indexes[name].get((namespace, labels[label]), ()))
        return None

    def resource(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """The resource as the watch last saw it; None when absent, not indexed, or older than our write."""
        index = next((self.indexes[i] for i, k in RESOURCE_INDEXES.items() if k == kind and i in self.indexes), None)
        found = list(index.get((namespace, name), ())) if index is not None else []
        if not found:
            return None
        body: dict[str, Any] = found[0]
        written = self.written.get((kind.plural, namespace, name))
        return body if written is None or written == _resource_version(body) else None

    def wrote(self, kind: Kind, body: Mapping[str, Any] | None) -> None:
        """Remember a version of a resource the operator has (written or read) as the newest it knows."""
        meta = _mapping((body or {}).get("metadata"))
        version = meta.get("resourceVersion")
        if isinstance(version, str) and isinstance(meta.get("name"), str):
            self.written[(kind.plural, str(meta.get("namespace") or "default"), meta["name"])] = version

    def saw(self, kind: Kind, body: Mapping[str, Any]) -> None:
        """The watch delivered ``body``: once it is the version last written, the index is current."""
        meta = _mapping(body.get("metadata"))
        key = (kind.plural, str(meta.get("namespace") or "default"), str(meta.get("name")))
        if key in self.written and self.written[key] == _resource_version(body):
            del self.written[key]


def _resource_version(body: Mapping[str, Any]) -> str | None:
    version = _mapping(body.get("metadata")).get("resourceVersion")
    return version if isinstance(version, str) else None


# ================================================================================================
# The shell: read, plan, apply
# ================================================================================================


class Reconciler:
    """Runs reconciles against the API: one at a time per resource, bursts coalesced."""

    def __init__(self, config: OperatorConfig, client: KubeClient | None = None,
                 progress_source: ProgressSource | None = None, metrics: OperatorMetrics | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self.client = client or KubeClient()
        self.progress_source: ProgressSource = progress_source or GrpcProgressSource(
            self.client, config.progress_timeout_s)
        self.metrics = metrics or OperatorMetrics()
        self.clock = clock
        self.cache: WatchCache | None = None  # set by the kopf handlers; None: read everything from the API
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str, str]] = set()
        self._deleted: dict[str, float] = {}  # uid -> when deleted, while an index may still show it
        self._rejected: dict[tuple[str, str], list[str]] = {}  # (namespace, run) -> refused creates

    def use_indexes(self, indexes: Mapping[str, Any]) -> None:
        """Read from kopf's indexes (passed to every handler as keyword arguments) from now on."""
        if self.cache is None and all(name in indexes for name in (*CHILD_INDEXES, *RESOURCE_INDEXES)):
            self.cache = WatchCache(indexes)

    async def _read(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.cache.resource(kind, namespace, name) if self.cache is not None else None
        if body is None:
            body = await self.client.get(kind, namespace, name)
            if self.cache is not None:
                self.cache.wrote(kind, body)
        return body

    async def _children(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        found = self.cache.children(kind, namespace, labels) if self.cache is not None else None
        return found if found is not None else await self.client.list(kind, namespace, labels)

    # -- entry points ---------------------------------------------------------------------------

    async def reconcile_flowrun(self, namespace: str, name: str) -> None:
        await self._locked((FLOWRUN_KIND, namespace, name), self._reconcile_flowrun)

    async def reconcile_flowservice(self, namespace: str, name: str) -> None:
        await self._locked((FLOWSERVICE_KIND, namespace, name), self._reconcile_flowservice)

    async def poke(self, kind: str, namespace: str, name: str) -> None:
        """Reconcile soon; if one is already waiting for the lock, that one covers this trigger too."""
        key = (kind, namespace, name)
        if key in self._pending:
            return
        self._pending.add(key)
        try:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                self._pending.discard(key)
                method = self._reconcile_flowrun if kind == FLOWRUN_KIND else self._reconcile_flowservice
                await self._measured(kind, method, namespace, name)
        except Exception as exc:  # a poke must never take the event handler down; the timer retries
            logger.warning("reconcile of %s %s/%s failed: %s", kind, namespace, name, str(exc) or repr(exc))
        finally:
            self._pending.discard(key)

    async def _locked(self, key: tuple[str, str, str],
                      method: Callable[[str, str], Awaitable[None]]) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            await self._measured(key[0], method, key[1], key[2])

    async def _measured(self, kind: str, method: Callable[[str, str], Awaitable[None]],
                        namespace: str, name: str) -> None:
        started = time.perf_counter()
        try:
            await method(namespace, name)
        except Exception as exc:
            self.metrics.errors.labels(kind=kind, error=type(exc).__name__).inc()
            self.metrics.reconciles.labels(kind=kind, result="error").inc()
            raise
        else:
            self.metrics.reconciles.labels(kind=kind, result="ok").inc()
        finally:
            self.metrics.latency.labels(kind=kind).observe(time.perf_counter() - started)

    # -- FlowRun --------------------------------------------------------------------------------

    async def _reconcile_flowrun(self, namespace: str, name: str) -> None:
        body = await self._read(FLOWRUNS, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        labels = {LABEL_FLOWRUN: name}
        pods, services, config_maps, policies, budgets = await asyncio.gather(
            self._children(PODS, namespace, labels), self._children(SERVICES, namespace, labels),
            self._children(CONFIG_MAPS, namespace, labels), self._children(NETWORK_POLICIES, namespace, labels),
            self._children(DISRUPTION_BUDGETS, namespace, labels),
        )
        children = RunChildren(pods=pods, services=services, config_maps=config_maps, network_policies=policies,
                               disruption_budgets=budgets)
        progress: Progress | None = None
        flowrun = _try_flowrun(body, self.config.defaults)
        if flowrun is not None and _mapping(body.get("status")).get("phase") not in FINISHED_PHASES:
            if not _all_pods_present(flowrun, pods):
                await self._check_secrets(flowrun, children)  # running pods already found their Secrets
            progress = await self._progress(flowrun, pods)
        children.rejected = self._rejected.get((namespace, name), [])
        children.lost_nodes = await self._lost_nodes(pods)
        plan = plan_flowrun(body, children, progress, self.clock(), self.config.render, self.config.defaults)
        rejected = await self._apply(FLOWRUNS, body, plan, flowrun)
        if rejected != children.rejected:
            if rejected:
                self._rejected[(namespace, name)] = rejected
            else:
                self._rejected.pop((namespace, name), None)
            # Say so now, not at the next trigger: the status and events of a plan that knows.
            children.rejected = rejected
            body = await self._read(FLOWRUNS, namespace, name) or body
            again = plan_flowrun(body, children, progress, self.clock(), self.config.render, self.config.defaults)
            await self._apply(FLOWRUNS, body, Plan(status=again.status, events=again.events), flowrun)
        old = _mapping(body.get("status"))
        if any(plan.status.get(k) != old.get(k) for k in ("lastCheckpoint", "bestCheckpoint")):
            for service in await self.flowservices_using(namespace, name):  # roll them to the new checkpoint
                await self.poke(FLOWSERVICE_KIND, namespace, service)

    async def _lost_nodes(self, pods: list[dict[str, Any]]) -> frozenset[str]:
        """The lost nodes among those holding pods stuck Terminating (one GET per such node, none otherwise)."""
        now = self.clock()
        nodes = {n for p in pods if pod_terminating(p) and pod_stuck_terminating(p, now) and (n := pod_node(p))}
        lost = await asyncio.gather(*(self.client.node_lost(n) for n in sorted(nodes)))
        return frozenset(n for n, gone in zip(sorted(nodes), lost, strict=True) if gone)

    async def _check_secrets(self, flowrun: FlowRun, children: RunChildren) -> None:
        for secret, where in referenced_secrets(flowrun):
            if await self.client.get(SECRETS, flowrun.namespace, secret) is None:
                children.missing_secrets.append(
                    f"Secret {secret!r} ({where}) not found in namespace {flowrun.namespace}: create it")
        if flowrun.spec.grpc_auth is None:
            token_name = f"{flowrun.name}-grpc-token"
            children.token_secret_exists = await self.client.get(SECRETS, flowrun.namespace, token_name) is not None

    async def _progress(self, flowrun: FlowRun, pods: list[dict[str, Any]]) -> Progress | None:
        learner = next((p for p in pods if p["metadata"].get("labels", {}).get(LABEL_MEMBER) == "learner"), None)
        if learner is None or pod_phase(learner) != "Running" or pod_terminating(learner):
            return None
        graph = compile_graph(flowrun, config_path=POD_CONFIG_PATH)
        address_of, _ = kubernetes_address(graph)
        ref = RunRef(flowrun.namespace, flowrun.name, address_of("learner", "grpc"), graph.token)
        try:
            return await asyncio.wait_for(self.progress_source(ref), self.config.progress_timeout_s)
        except Exception as exc:  # progress is best-effort; the run goes on without it
            logger.info("no progress from %s/%s: %s", flowrun.namespace, flowrun.name, exc)
            return None

    async def _apply(self, kind: Kind, body: Mapping[str, Any], plan: Plan, flowrun: FlowRun | None) -> list[str]:
        """Write ``plan``; the creates the API server refused (``REJECTION_STATUSES``), one line each."""
        meta = body["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        patch = status_patch(body.get("status"), plan.status)
        if patch:
            current = await self.client.patch(kind, namespace, name, {"status": patch}, subresource="status")
            if current is None or current.get("metadata", {}).get("deletionTimestamp"):
                return []  # deleted meanwhile: creating children now would leave orphans behind
            if self.cache is not None:
                self.cache.wrote(kind, current)
        if plan.status.get("restartCount", 0) > (body.get("status") or {}).get("restartCount", 0):
            self.metrics.group_restarts.inc()
        for event in plan.events:
            _post_event(body, event)
        # Children are independent of each other: each step's calls go out concurrently.
        await asyncio.gather(*(self.client.delete(kind_of(o), namespace, object_name(o))
                               for o in self._not_yet_deleted(plan.delete)))
        for pod in plan.force_delete:
            logger.warning("force-deleting pod %s/%s: Terminating on lost node %s", namespace, object_name(pod),
                           pod_node(pod))
        await asyncio.gather(*(self.client.delete(PODS, namespace, object_name(p), grace_period_s=0)
                               for p in plan.force_delete))
        await asyncio.gather(*(self.client.patch(kind_of(d), namespace, object_name(d), merge_patch(o, d))
                               for o, d in plan.update))
        creates = list(plan.create)
        if plan.create_token_secret and flowrun is not None:
            creates.insert(0, render_token_secret(flowrun, secrets.token_urlsafe(32)))
        results = await asyncio.gather(*(self.client.create(obj) for obj in creates), return_exceptions=True)
        rejected = [f"{obj['kind']} {object_name(obj)}: {result.message}"
                    for obj, result in zip(creates, results, strict=True)
                    if isinstance(result, ApiError) and result.status in REJECTION_STATUSES]
        failed = [r for r in results if isinstance(r, BaseException)
                  and not (isinstance(r, ApiError) and r.status in REJECTION_STATUSES)]
        if failed:
            raise failed[0]
        if plan.delete_self:
            logger.info("deleting %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
            await self.client.delete(kind, namespace, name)
        return rejected

    def _not_yet_deleted(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``objects`` less those deleted moments ago (an index shows them until the watch says so)."""
        now = time.monotonic()
        self._deleted = {uid: t for uid, t in self._deleted.items() if now - t < DELETE_MEMORY_S}
        out = []
        for obj in objects:
            uid = _mapping(obj.get("metadata")).get("uid")
            if isinstance(uid, str) and uid in self._deleted and self.cache is not None:
                continue
            if isinstance(uid, str):
                self._deleted[uid] = now
            out.append(obj)
        return out

    async def cleanup_flowrun(self, namespace: str, name: str) -> None:
        """Delete every child now (the garbage collector would, later, through owner references)."""
        labels = {LABEL_FLOWRUN: name}
        for child_kind in (PODS, SERVICES, CONFIG_MAPS, NETWORK_POLICIES, DISRUPTION_BUDGETS, SECRETS):
            for obj in await self.client.list(child_kind, namespace, labels):
                if obj.get("metadata", {}).get("labels", {}).get(LABEL_MANAGED_BY) == MANAGED_BY:
                    await self.client.delete(child_kind, namespace, object_name(obj))

    async def cleanup_flowservice(self, namespace: str, name: str) -> None:
        labels = {LABEL_FLOWSERVICE: name}
        for child_kind in (DEPLOYMENTS, SERVICES):
            for obj in await self.client.list(child_kind, namespace, labels):
                if obj.get("metadata", {}).get("labels", {}).get(LABEL_MANAGED_BY) == MANAGED_BY:
                    await self.client.delete(child_kind, namespace, object_name(obj))

    # -- FlowService ----------------------------------------------------------------------------

    async def _reconcile_flowservice(self, namespace: str, name: str) -> None:
        body = await self._read(FLOWSERVICES, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        labels = {LABEL_FLOWSERVICE: name}
        deployments, services = await asyncio.gather(
            self._children(DEPLOYMENTS, namespace, labels), self._children(SERVICES, namespace, labels))
        children = ServiceChildren(deployment=deployments[0] if deployments else None,
                                   service=services[0] if services else None)
        spec = _mapping(body.get("spec"))
        ref = _mapping(_mapping(spec.get("model")).get("flowRun"))
        if isinstance(ref.get("name"), str):
            children.flowrun = await self._read(FLOWRUNS, namespace, ref["name"])
        for field_name in ("auth",):
            secret = spec.get(field_name)
            if isinstance(secret, Mapping) and isinstance(secret.get("name"), str) \
                    and await self.client.get(SECRETS, namespace, secret["name"]) is None:
                children.missing_secrets.append(
                    f"Secret {secret['name']!r} (spec.{field_name}) not found in namespace {namespace}: create it")
        plan = plan_flowservice(body, children, self.clock(), self.config.render, self.config.defaults)
        await self._apply(FLOWSERVICES, body, plan, None)

    async def flowservices_using(self, namespace: str, flowrun: str) -> list[str]:
        """FlowServices in ``namespace`` that serve a checkpoint of ``flowrun``."""
        names = []
        for item in await self.client.list(FLOWSERVICES, namespace, {}):
            model = ((item.get("spec") or {}).get("model") or {})
            if isinstance(model, Mapping) and (model.get("flowRun") or {}).get("name") == flowrun:
                names.append(object_name(item))
        return names


def _all_pods_present(flowrun: FlowRun, pods: list[dict[str, Any]]) -> bool:
    """Whether every pod the run needs exists and is not being deleted."""
    live = {object_name(p) for p in pods if not pod_terminating(p)}
    return {child_name(flowrun.name, c.name) for c in compile_graph(flowrun).components} <= live


def _try_flowrun(body: Mapping[str, Any], defaults: ClusterDefaults) -> FlowRun | None:
    try:
        return apply_cluster_defaults(validate_resource(FlowRun, flowrun_object(body), FLOWRUN_KIND), defaults)
    except InvalidResourceError:
        return None


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a kopf body (a view over the watch event's data) that nothing else changes.

    (A JSON round trip: the data came as JSON, and it copies several times faster than deepcopy.)
    """
    copied: dict[str, Any] = json.loads(json.dumps(dict(body)))
    return copied


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _post_event(body: Mapping[str, Any], event: Event) -> None:
    try:
        kopf.event(cast(Any, dict(body)), type=event.type.value, reason=event.reason, message=event.message[:1024])
    except LookupError:  # outside a running operator (unit use): nothing to post to
        logger.info("%s %s: %s", event.type.value, event.reason, event.message)


# ================================================================================================
# kopf wiring
# ================================================================================================


def timer_active(**kw: Any) -> bool:
    """A FlowRun's timer ticks while the run is not finished, or is finished and waits for its TTL."""
    return (kw["status"] or {}).get("phase") not in FINISHED_PHASES \
        or (kw["spec"] or {}).get("ttlSecondsAfterFinished") is not None


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Attach flowlane's handlers to a kopf registry (one registry per operator instance)."""
    config = reconciler.config
    group, version = "flowlane.dev", "v1alpha1"

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = connection(config, **kwargs)
        if info is not None:
            reconciler.client.connect(info)
            reconciler.client.relogin = lambda: connection(config, **kwargs)  # reads the token file again
        return info

    # Indexes first: kopf fills them from each watch's initial list before any handler below runs.
    def index_children(index_id: str, kind: Kind, label: str) -> None:
        @kopf.index(kind.group, kind.version, kind.plural, id=index_id, registry=registry,
                    labels={LABEL_MANAGED_BY: MANAGED_BY, label: kopf.PRESENT})
        def index(**kw: Any) -> dict[tuple[str, str], dict[str, Any]]:
            return {(kw["namespace"], kw["labels"][label]): _plain(kw["body"])}

    for index_id, (child_kind, owner_label) in CHILD_INDEXES.items():
        index_children(index_id, child_kind, owner_label)

    def index_resource(index_id: str, kind: Kind) -> None:
        @kopf.index(kind.group, kind.version, kind.plural, id=index_id, registry=registry)
        def index(**kw: Any) -> dict[tuple[str, str], dict[str, Any]]:
            body = _plain(kw["body"])
            if reconciler.cache is not None:
                reconciler.cache.saw(kind, body)
            return {(kw["namespace"], kw["name"]): body}

    for index_id, resource_kind in RESOURCE_INDEXES.items():
        index_resource(index_id, resource_kind)

    @kopf.on.probe(id="reconciles", registry=registry)
    def probe(**_: Any) -> float:
        return sum(reconciler.metrics.value("flowlane_operator_reconciles_total", {"kind": k, "result": "ok"})
                   for k in (FLOWRUN_KIND, FLOWSERVICE_KIND))

    # kopf passes every handler many keyword arguments; each takes the ones it needs from **kw.
    async def flowrun_handler(**kw: Any) -> None:
        reconciler.use_indexes(kw)
        try:
            await reconciler.reconcile_flowrun(kw["namespace"], kw["name"])
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=2) from exc

    for decorator in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorator(group, version, FLOWRUN_PLURAL, registry=registry, id="reconcile")(flowrun_handler)

    @kopf.timer(group, version, FLOWRUN_PLURAL, interval=config.reconcile_interval_s,
                initial_delay=config.reconcile_interval_s, registry=registry, id="periodic", when=timer_active)
    async def flowrun_timer(**kw: Any) -> None:
        reconciler.use_indexes(kw)
        await reconciler.poke(FLOWRUN_KIND, kw["namespace"], kw["name"])

    if config.explicit_cleanup:
        @kopf.on.delete(group, version, FLOWRUN_PLURAL, registry=registry, id="cleanup")
        async def flowrun_deleted(**kw: Any) -> None:
            await reconciler.cleanup_flowrun(kw["namespace"], kw["name"])

    @kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_FLOWRUN: kopf.PRESENT},
                   registry=registry)
    async def pod_changed(**kw: Any) -> None:
        if kw["type"] == "ADDED" and not kw["status"]:
            return  # a pod the operator just created: nothing new to decide
        reconciler.use_indexes(kw)
        await reconciler.poke(FLOWRUN_KIND, kw["namespace"], kw["labels"][LABEL_FLOWRUN])

    async def flowservice_handler(**kw: Any) -> None:
        reconciler.use_indexes(kw)
        try:
            await reconciler.reconcile_flowservice(kw["namespace"], kw["name"])
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=2) from exc

    for decorator in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorator(group, version, FLOWSERVICE_PLURAL, registry=registry, id="reconcile")(flowservice_handler)

    @kopf.timer(group, version, FLOWSERVICE_PLURAL, interval=config.reconcile_interval_s,
                initial_delay=config.reconcile_interval_s, registry=registry, id="periodic")
    async def flowservice_timer(**kw: Any) -> None:
        reconciler.use_indexes(kw)
        await reconciler.poke(FLOWSERVICE_KIND, kw["namespace"], kw["name"])

    if config.explicit_cleanup:
        @kopf.on.delete(group, version, FLOWSERVICE_PLURAL, registry=registry, id="cleanup")
        async def flowservice_deleted(**kw: Any) -> None:
            await reconciler.cleanup_flowservice(kw["namespace"], kw["name"])

    @kopf.on.event("apps", "v1", "deployments",
                   labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_FLOWSERVICE: kopf.PRESENT}, registry=registry)
    async def deployment_changed(**kw: Any) -> None:
        reconciler.use_indexes(kw)
        await reconciler.poke(FLOWSERVICE_KIND, kw["namespace"], kw["labels"][LABEL_FLOWSERVICE])


def watch_only_flowlane_children(settings: kopf.OperatorSettings) -> None:
    """Server-side label selectors on the child watches: the API server sends only flowlane's objects.

    (The handlers' ``labels=`` filters alone are applied by kopf on the client, after every pod and
    Service in the cluster has crossed the wire.)
    """
    for kind in {k for k, _ in CHILD_INDEXES.values()}:
        settings.watching.label_selectors[kind.group, kind.version, kind.plural] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


async def run_operator(config: OperatorConfig, *, progress_source: ProgressSource | None = None,
                       metrics: OperatorMetrics | None = None, stop_flag: Any = None, ready_flag: Any = None,
                       clock: Callable[[], datetime] = utcnow) -> None:
    """Run the operator until ``stop_flag`` is set (or forever): the entry point of every runner."""
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(config, progress_source=progress_source, metrics=metrics, clock=clock)
    register(registry, reconciler)
    settings = kopf_settings(config)
    watch_only_flowlane_children(settings)
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=config.clusterwide,
            namespaces=config.namespaces,
            standalone=config.standalone,
            liveness_endpoint=config.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=kopf.Memo(reconciler=reconciler),
        )
    finally:
        await reconciler.client.close()


__all__ = [
    "ApiError", "Event", "GrpcProgressSource", "KubeClient", "Plan", "Progress", "ProgressSource",
    "Reconciler", "RunChildren", "RunRef", "ServiceChildren", "merge_patch", "plan_flowrun",
    "plan_flowservice", "register", "run_operator", "status_patch",
]
