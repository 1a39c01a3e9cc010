"""The reconciler: reads a resource and its children, plans (``reconcile.py``), applies the plan.

``reconcile.py`` is the pure part: given what is observed, it decides (a ``Plan``), with no I/O.
This module is the part that talks to Kubernetes around it (through ``kube_client.py``). A
reconcile reads the resource, its children, the Secrets it references and, while the learner
runs, its progress from a ``ProgressSource`` (by default the learner's ``GetStatus`` gRPC call,
``progress.py``; tests feed their own). ``plan_flowrun`` decides; ``Reconciler._apply`` writes the
status, then deletes, updates and creates children, then posts events. Reconciles are serialised
per resource by a lock; triggers that arrive while a reconcile is already waiting are folded into
it, so a burst of pod events costs one reconcile. The kopf handlers that trigger reconciles, and
register the indexes named here, live in ``handlers.py``.

**Cheap reconciles.** Hundreds of runs must not cost the API server hundreds of requests a
second. The operator's watches carry server-side label selectors (only flowlane's children reach
it), and kopf indexes fed by those watches hold every FlowRun, FlowService and child
(``CHILD_INDEXES``, ``RESOURCE_INDEXES``), so a reconcile reads them from memory (``WatchCache``),
not with LIST and GET calls. A resource read from an index is trusted once the watch has
delivered the operator's own last write to it (its resourceVersion); until then it is read with
one GET, so a reconcile never acts on a status older than the one it wrote. Referenced Secrets
are checked only while pods remain to be created, the learner's token is read once per run, and
timers stop for finished runs. A Running run then costs its status patch per interval (when
progress changed) and nothing else; a finished one costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, cast

import kopf

from flowlane.api.common import InvalidResourceError, utcnow, validate_resource
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import FlowRun, Phase
from flowlane.api.flowservice import KIND as FLOWSERVICE_KIND
from flowlane.operator.graph import POD_CONFIG_PATH, compile_graph
from flowlane.operator.kube_client import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    DISRUPTION_BUDGETS,
    FLOWRUNS,
    FLOWSERVICES,
    NETWORK_POLICIES,
    PODS,
    REJECTION_STATUSES,
    SECRETS,
    SERVICES,
    ApiError,
    Kind,
    KubeClient,
    kind_of,
)
from flowlane.operator.pods import object_name, pod_node, pod_phase, pod_stuck_terminating, pod_terminating
from flowlane.operator.progress import GrpcProgressSource
from flowlane.operator.reconcile import (
    Event,
    Plan,
    Progress,
    ProgressSource,
    RunChildren,
    RunRef,
    apply_cluster_defaults,
    flowrun_object,
    kueue_preempted,
    plan_flowrun,
    referenced_secrets,
)
from flowlane.operator.reconcile_service import ServiceChildren, plan_flowservice
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
from flowlane.operator.settings import ClusterDefaults, OperatorConfig, OperatorMetrics

logger = logging.getLogger("flowlane.operator")

FINISHED_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)
#: How long a deleted child is not deleted again while the watch still shows it.
DELETE_MEMORY_S = 30.0
#: How long the learner may take to write the checkpoint asked for when Kueue preempts its run
#: (a step in flight completes first); within a pod's default 30 s grace period plus the upload.
PREEMPTION_CHECKPOINT_S = 60.0


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
            if kueue_preempted(body, pods):  # once, when Kueue starts stopping the group
                progress = await self._checkpoint_before_preemption(flowrun, pods) or progress
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

    def _learner_ref(self, flowrun: FlowRun, pods: list[dict[str, Any]], *, terminating: bool) -> RunRef | None:
        """Where the run's learner answers gRPC; None unless its pod runs (and, unless asked, is not going)."""
        graph = compile_graph(flowrun, config_path=POD_CONFIG_PATH)
        lead = graph.lead_learner  # rank 0's pod serves gRPC
        learner = next((p for p in pods if p["metadata"].get("labels", {}).get(LABEL_MEMBER) == lead), None)
        if learner is None or pod_phase(learner) != "Running" or (pod_terminating(learner) and not terminating):
            return None
        address_of, _ = kubernetes_address(graph)
        return RunRef(flowrun.namespace, flowrun.name, address_of(lead, "grpc"), graph.token)

    async def _progress(self, flowrun: FlowRun, pods: list[dict[str, Any]]) -> Progress | None:
        ref = self._learner_ref(flowrun, pods, terminating=False)
        if ref is None:
            return None
        try:
            return await asyncio.wait_for(self.progress_source(ref), self.config.progress_timeout_s)
        except Exception as exc:  # progress is best-effort; the run goes on without it
            logger.info("no progress from %s/%s: %s", flowrun.namespace, flowrun.name, exc)
            return None

    async def _checkpoint_before_preemption(self, flowrun: FlowRun, pods: list[dict[str, Any]]) -> Progress | None:
        """Kueue is stopping the group: have the learner, still serving through its grace period,
        checkpoint the last completed step before the rest of the group goes (its SIGTERM handler
        would too, but only this way does the status name the checkpoint the run resumes from)."""
        ref = self._learner_ref(flowrun, pods, terminating=True)
        if ref is None:
            return None
        try:
            saved = await asyncio.wait_for(self.progress_source.checkpoint(ref, PREEMPTION_CHECKPOINT_S),
                                           PREEMPTION_CHECKPOINT_S + 1)
        except Exception as exc:  # the learner's own SIGTERM checkpoint remains
            logger.warning("checkpoint before preemption of %s/%s failed: %s", flowrun.namespace, flowrun.name, exc)
            return None
        if saved is not None:
            logger.info("%s/%s preempted: checkpoint %s (step %s)", flowrun.namespace, flowrun.name,
                        saved.last_checkpoint, saved.step)
        return saved

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


#: Fields the API server fills in and owns (a Service's cluster IPs): never nulled by an update.
SERVER_OWNED_FIELDS = frozenset({"clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy",
                                 "sessionAffinity", "healthCheckNodePort"})


def merge_patch(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``observed`` into ``desired`` for the fields flowlane renders.

    Labels and annotations are merged (others may add theirs); everything else under the rendered
    top-level keys (spec, data, ...) is made equal, keys flowlane no longer renders set to null.
    """

    def diff(old: Any, new: Any) -> Any:
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            return new
        out: dict[str, Any] = {k: diff(old.get(k), v) for k, v in new.items() if old.get(k) != v}
        out.update({k: None for k in old if k not in new and k not in SERVER_OWNED_FIELDS})
        return out

    patch: dict[str, Any] = {"metadata": {
        "labels": desired["metadata"].get("labels", {}),
        "annotations": desired["metadata"].get("annotations", {}),
    }}
    for key, value in desired.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            patch[key] = diff(observed.get(key, {}), value)
    return patch


def status_patch(old: Any, new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of the status subresource: changed keys, and null for keys that went away."""
    old = old if isinstance(old, Mapping) else {}
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def _all_pods_present(flowrun: FlowRun, pods: list[dict[str, Any]]) -> bool:
    """Whether every pod the run needs exists and is not being deleted."""
    live = {object_name(p) for p in pods if not pod_terminating(p)}
    return {child_name(flowrun.name, c.name) for c in compile_graph(flowrun).components} <= live


def _try_flowrun(body: Mapping[str, Any], defaults: ClusterDefaults) -> FlowRun | None:
    try:
        return apply_cluster_defaults(validate_resource(FlowRun, flowrun_object(body), FLOWRUN_KIND), defaults)
    except InvalidResourceError:
        return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _post_event(body: Mapping[str, Any], event: Event) -> None:
    try:
        kopf.event(cast(Any, dict(body)), type=event.type.value, reason=event.reason, message=event.message[:1024])
    except LookupError:  # outside a running operator (unit use): nothing to post to
        logger.info("%s %s: %s", event.type.value, event.reason, event.message)


__all__ = ["CHILD_INDEXES", "DELETE_MEMORY_S", "FINISHED_PHASES", "RESOURCE_INDEXES", "Reconciler", "WatchCache",
           "merge_patch", "status_patch"]
