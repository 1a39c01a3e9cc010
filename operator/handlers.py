"""The kopf wiring: which kopf handlers the operator registers, and the entry point that runs it.

kopf delivers the triggers: a FlowRun or FlowService created, resumed after an operator restart or
edited; a periodic timer; any change to a pod or Deployment flowlane owns. Each trigger becomes a
reconcile of the owning resource by the ``Reconciler`` (``kube_reconciler.py``), which reads,
plans (``reconcile.py``, pure) and applies. API errors in a kopf handler become
``kopf.TemporaryError`` so kopf retries with a delay; nothing a user writes can crash the operator.

The rest of the operator, by concern: ``kube_client.py``, the Kubernetes REST client;
``kube_reconciler.py``, the reconciles and the watch cache they read (kopf's indexes, registered
here, with server-side label selectors on the child watches); ``progress.py``, the learner's
progress over gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import kopf

from flowlane.api.common import utcnow
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import PLURAL as FLOWRUN_PLURAL
from flowlane.api.flowservice import KIND as FLOWSERVICE_KIND
from flowlane.api.flowservice import PLURAL as FLOWSERVICE_PLURAL
from flowlane.operator.kube_client import ApiError, Kind
from flowlane.operator.kube_reconciler import CHILD_INDEXES, FINISHED_PHASES, RESOURCE_INDEXES, Reconciler
from flowlane.operator.reconcile import ProgressSource
from flowlane.operator.render import LABEL_FLOWRUN, LABEL_FLOWSERVICE, LABEL_MANAGED_BY, MANAGED_BY
from flowlane.operator.settings import OperatorConfig, OperatorMetrics, connection, kopf_settings


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


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a kopf body (a view over the watch event's data) that nothing else changes.

    (A JSON round trip: the data came as JSON, and it copies several times faster than deepcopy.)
    """
    copied: dict[str, Any] = json.loads(json.dumps(dict(body)))
    return copied


__all__ = ["register", "run_operator", "timer_active", "watch_only_flowlane_children"]
