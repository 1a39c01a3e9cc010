"""Kubernetes fixtures: the KMock API emulator over HTTP and the real kopf operator against it.

KMock (the emulator written for testing kopf operators) runs for the whole session in a thread of
its own with its own event loop, serving on a loopback port. Tests talk to it over HTTP like
``kubectl`` would, through ``KubeApi`` (a small synchronous client that also plays the API server's
part KMock leaves out: uid, generation and creation time). Each test gets a fresh namespace, so
tests never see each other's objects.

``start_operator`` runs the real operator (``flowlane.operator.handlers.run_operator``: kopf with
flowlane's handlers) in another thread, namespace-scoped to the test's namespace, logged in to
KMock, with a ``FakeProgress`` the test fills in place of the learner's gRPC status.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import httpx
import kmock
import pytest

from flowlane.operator.handlers import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    FLOWRUNS,
    FLOWSERVICES,
    NETWORK_POLICIES,
    PODS,
    SECRETS,
    SERVICES,
    Kind,
)
from flowlane.operator.reconcile import Progress, RunRef
from flowlane.operator.settings import OperatorConfig, OperatorMetrics

T = TypeVar("T")

EVENTS = Kind("", "v1", "events")
_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True),
    "v1/services": kmock.ResourceInfo(kind="Service", singular="service", namespaced=True),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(
        kind="NetworkPolicy", singular="networkpolicy", namespaced=True),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", singular="deployment", namespaced=True,
                                              subresources={"status", "scale"}),
    "flowlane.dev/v1alpha1/flowruns": kmock.ResourceInfo(
        kind="FlowRun", singular="flowrun", namespaced=True, shortnames={"fr"}, categories={"flowlane"},
        subresources={"status"}),
    "flowlane.dev/v1alpha1/flowservices": kmock.ResourceInfo(
        kind="FlowService", singular="flowservice", namespaced=True, shortnames={"fsvc"},
        categories={"flowlane"}, subresources={"status", "scale"}),
}
_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


_resource_versions = itertools.count(1)
_event_seq = itertools.count(1)


class _RecordingBus(kmock.Bus[Any]):
    """KMock's event bus plus a bounded history, so watches can resume from a resourceVersion."""

    def __init__(self) -> None:
        super().__init__()
        self.history: collections.deque[tuple[int, Any]] = collections.deque(maxlen=20000)
        self.last_seq = 0

    async def put(self, *items: Any) -> None:
        for item in items:
            self.last_seq = next(_event_seq)
            self.history.append((self.last_seq, item))
        await super().put(*items)


class ApiServerEmulator(kmock.KubernetesEmulator):
    """KMock plus the bookkeeping a real API server does on every write and kopf relies on.

    Lists honour label selectors and watches lose no events. A new object gets a uid, a creation
    time, generation 1 and a name from its ``generateName`` (kopf names its Kubernetes events that
    way); every write gets a fresh
    resourceVersion (kopf uses it to tell its own patches from stale watch events); a change of
    ``spec`` bumps ``metadata.generation``.
    """

    #: KMock matches each request against its reactions by scanning every request it recorded, so a
    #: session-long server slows down quadratically; only the newest requests are kept.
    keep_requests = 8

    #: When each object was first stored: (plural, namespace, name) -> time.monotonic() (benchmarks).
    created_at: dict[tuple[str, str, str], float] = {}  # noqa: RUF012  (one emulator per process)

    async def _handle(self, request: Any) -> Any:
        if len(self._requests) > 4 * self.keep_requests:
            del self._requests[: -self.keep_requests]
        data = request.data
        action = request.action
        if request.resource is not None and action in (kmock.action.CREATE, kmock.action.UPDATE):
            version = str(next(_resource_versions))
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                if action == kmock.action.CREATE:
                    if not meta.get("name") and meta.get("generateName"):
                        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                    key3 = (request.resource.plural, request.namespace or meta.get("namespace"), meta["name"])
                    self.created_at.setdefault(key3, time.monotonic())
                    meta.setdefault("uid", str(uuid.uuid4()))
                    meta.setdefault("generation", 1)
                    meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                elif "spec" in data and not request.subresource:
                    key = (request.resource, request.namespace, request.name)
                    current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
                    meta["generation"] = current.get("metadata", {}).get("generation", 0) + 1
            elif isinstance(data, list):  # a JSON patch, guarded by a test of resourceVersion
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
                for op in data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                            and op.get("value") != current.get("metadata", {}).get("resourceVersion"):
                        raise kmock.KubernetesError(status=422, reason="Invalid",
                                                    message="the object has been modified; resourceVersion differs")
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        return await super()._handle(request)


    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = collections.defaultdict(_RecordingBus)

    async def _serve_watch(self, request: Any) -> Any:
        """A watch that resumes after the list it follows, without gaps or replays.

        KMock answers every watch with the current objects and then new changes, whatever
        ``resourceVersion`` the client passes. kopf lists, patches, then watches: the replay hands it
        its own object as it was before the patch, and kopf gets stuck on a stale version. A real
        API server sends exactly the changes after the given resourceVersion; so does this one.
        """
        yield b""
        bus = cast(_RecordingBus, self._buses[request.resource])
        since = request.params.get("resourceVersion", "")
        async with self._lock:  # every put happens under this lock: the marker and history agree
            marker = await bus.mark()
            if since.isdigit():
                events = [event for seq, event in bus.history if seq > int(since)]
            else:
                objs = [o for o in self._emulator_objects(request) if not o.deleted]
                events = [{"type": "ADDED", "object": o.raw} for o in objs]
        try:
            for event in [*events, None]:
                if event is None:
                    break
                if self._visible(request, event):
                    yield event
            async for event in bus.stream(since=marker):
                if self._visible(request, event):
                    yield event
        finally:
            await bus.unmark(marker)

    # KMock keeps its object lookup private (name-mangled); the watch above needs it as it is.
    def _emulator_objects(self, request: Any) -> list[Any]:
        return cast(list[Any], self._KubernetesEmulator__get_objs(request, strict=False))  # type: ignore[attr-defined]

    def _visible(self, request: Any, event: dict[str, Any]) -> bool:
        meta = event.get("object", {}).get("metadata", {})
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        return bool(check(request, request.resource, meta.get("namespace"), meta.get("name"), strict=False))

    async def _serve_list(self, request: Any) -> Any:
        """Lists honour equality label selectors (``a=b,c=d``), as a real API server does."""
        payload: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        payload["metadata"] = {"resourceVersion": str(cast(_RecordingBus, self._buses[request.resource]).last_seq)}
        selector = dict(
            term.split("=", 1) for term in (request.params.get("labelSelector") or "").split(",") if "=" in term
        )
        if selector:
            payload["items"] = [i for i in payload["items"] if all(
                i.get("metadata", {}).get("labels", {}).get(k) == v for k, v in selector.items())]
        return payload


class KMockServer:
    """KMock's Kubernetes emulator on a loopback port, served from a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self.emulator: ApiServerEmulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def start(self) -> KMockServer:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"KMock did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
            for resource, info in _RESOURCES.items():
                info.verbs = set(_VERBS)
                emulator.resources[resource] = info
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in KMock's loop thread (to add reactions without racing the server)."""
        done: dict[str, Any] = {}
        event = threading.Event()

        def run() -> None:
            try:
                done["value"] = fn()
            except BaseException as exc:
                done["error"] = exc
            event.set()

        self.loop.call_soon_threadsafe(run)
        event.wait(10)
        if "error" in done:
            raise done["error"]
        value: T = done["value"]
        return value

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class KubeApi:
    """A synchronous client for tests, like ``kubectl`` on the test's namespace."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.http = httpx.Client(base_url=url, timeout=10)

    def create(self, kind: Kind, obj: Mapping[str, Any]) -> dict[str, Any]:
        body = dict(obj)
        meta = dict(body.get("metadata", {}))
        meta.setdefault("namespace", self.namespace)
        body["metadata"] = meta
        response = self.http.post(kind.path(meta["namespace"]), json=body)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        response = self.http.get(kind.path(self.namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def patch(self, kind: Kind, name: str, patch: Mapping[str, Any], subresource: str | None = None) -> None:
        response = self.http.patch(kind.path(self.namespace, name, subresource), json=patch,
                                   headers={"Content-Type": "application/merge-patch+json"})
        response.raise_for_status()

    def delete(self, kind: Kind, name: str) -> None:
        self.http.delete(kind.path(self.namespace, name)).raise_for_status()

    def objects(self, kind: Kind, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        response = self.http.get(kind.path(self.namespace))
        response.raise_for_status()
        items = response.json().get("items", [])
        return [i for i in items if i.get("metadata", {}).get("namespace") == self.namespace
                and all(i["metadata"].get("labels", {}).get(k) == v for k, v in (labels or {}).items())]

    def names(self, kind: Kind, labels: Mapping[str, str] | None = None) -> list[str]:
        return sorted(i["metadata"]["name"] for i in self.objects(kind, labels))

    def set_pod_phase(self, name: str, phase: str, **status: Any) -> None:
        """Play the kubelet: move a pod to ``phase`` (Running, Succeeded, Failed)."""
        self.patch(PODS, name, {"status": {"phase": phase, **status}}, subresource="status")

    def run_pods(self, run: str) -> None:
        for name in self.names(PODS, {"flowlane.dev/flowrun": run}):
            self.set_pod_phase(name, "Running")


def wait_until(fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``fn`` until it returns something truthy; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last value {last!r}")


@dataclass
class FakeProgress:
    """A ``ProgressSource`` whose answers the test sets: ``progress.set("run", Progress(step=3))``."""

    values: dict[str, Progress] = field(default_factory=dict)
    asked: list[RunRef] = field(default_factory=list)

    def set(self, run: str, progress: Progress) -> None:
        self.values[run] = progress

    async def __call__(self, run: RunRef) -> Progress | None:
        self.asked.append(run)
        return self.values.get(run.name)


class OperatorThread:
    """The real operator (kopf + flowlane handlers) in a thread, stopped by ``stop()``."""

    def __init__(self, config: OperatorConfig, progress: FakeProgress) -> None:
        self.config = config
        self.progress = progress
        self.metrics = OperatorMetrics()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flowlane-operator", daemon=True)

    def _run(self) -> None:
        from flowlane.operator.handlers import run_operator

        try:
            asyncio.run(run_operator(self.config, progress_source=self.progress, metrics=self.metrics,
                                     stop_flag=self._stop, ready_flag=self._ready))
        except BaseException as exc:
            self._error = exc

    def start(self) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the operator did not become ready: {self._error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("the operator did not stop within 30 s")
        if self._error is not None:
            raise self._error


_namespaces = itertools.count()


@pytest.fixture(scope="session")
def kmock_server() -> Iterator[KMockServer]:
    server = KMockServer().start()
    yield server
    server.stop()


@pytest.fixture
def kube(kmock_server: KMockServer) -> Iterator[KubeApi]:
    """A KubeApi on a namespace of its own."""
    namespace = f"t{next(_namespaces)}-{uuid.uuid4().hex[:6]}"
    api = KubeApi(kmock_server.url, namespace)
    yield api
    api.http.close()


@pytest.fixture
def start_operator(kube: KubeApi, kmock_server: KMockServer) -> Iterator[Callable[..., OperatorThread]]:
    """Start the operator on the test's namespace: ``op = start_operator(reconcile_interval_s=0.2)``."""
    running: list[OperatorThread] = []

    def start(progress: FakeProgress | None = None, **overrides: Any) -> OperatorThread:
        values: dict[str, Any] = {"namespaces": [kube.namespace], "server": kmock_server.url, "insecure": True,
                                  "health_port": None, "metrics_port": None, "reconcile_interval_s": 0.5,
                                  # KMock cannot list namespaces; discover the resources once at start.
                                  "scanning": False, "log_level": "warning"}
        values.update(overrides)
        operator = OperatorThread(OperatorConfig(**values), progress or FakeProgress()).start()
        running.append(operator)
        return operator

    yield start
    for operator in running:
        if operator._thread.is_alive():
            operator.stop()


__all__ = ["CONFIG_MAPS", "DEPLOYMENTS", "EVENTS", "FLOWRUNS", "FLOWSERVICES", "NETWORK_POLICIES", "PODS",
           "SECRETS", "SERVICES", "FakeProgress", "KMockServer", "KubeApi", "OperatorThread", "wait_until"]
