"""Kubernetes fixtures: the KMock API emulator over HTTP and the real kopf operator against it.

KMock (the emulator written for testing kopf operators) runs for the whole session in a thread of
its own with its own event loop, serving on a loopback port. Tests talk to it over HTTP like
``kubectl`` would, through ``KubeApi`` (a small synchronous client that also plays the API server's
part KMock leaves out: uid, generation and creation time). Each test gets a fresh namespace, so
tests never see each other's objects.

The emulator is complete enough for the real ``kubectl`` (the ``kubectl`` fixture runs it against
the session server in the test's namespace): typed lists, CustomResourceDefinitions that serve
their resources, server-side tables with the CRDs' printer columns, merge and strategic-merge
patches, field selectors, and an OpenAPI v3 document from the CRDs' schemas that kubectl's
validation and ``kubectl explain`` read.

``start_operator`` runs the real operator (``flowlane.operator.handlers.run_operator``: kopf with
flowlane's handlers) in another thread, namespace-scoped to the test's namespace, logged in to
KMock, with a ``FakeProgress`` the test fills in place of the learner's gRPC status.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp.web
import attrs
import httpx
import kmock
import pytest

from flowlane.operator.kube_client import (
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
CRDS = Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions")  # cluster-scoped: no Kind.path
_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True, shortnames={"po"},
                                  subresources={"status"}),
    "v1/services": kmock.ResourceInfo(kind="Service", singular="service", namespaced=True, shortnames={"svc"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True, shortnames={"cm"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True, shortnames={"ev"}),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, shortnames={"ns"}),
    "v1/nodes": kmock.ResourceInfo(kind="Node", singular="node", namespaced=False, shortnames={"no"},
                                   subresources={"status"}),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(
        kind="NetworkPolicy", singular="networkpolicy", namespaced=True, shortnames={"netpol"}),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(
        kind="PodDisruptionBudget", singular="poddisruptionbudget", namespaced=True, shortnames={"pdb"},
        subresources={"status"}),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", singular="deployment", namespaced=True,
                                              shortnames={"deploy"}, subresources={"status", "scale"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        shortnames={"crd", "crds"}, categories={"api-extensions"}, subresources={"status"}),
    # Served before any CRD is applied, so that tests need not apply them; applying the CRDs
    # (crds/*.yaml) stores them and replaces these entries with what the CRDs declare.
    "flowlane.dev/v1alpha1/flowruns": kmock.ResourceInfo(
        kind="FlowRun", singular="flowrun", namespaced=True, shortnames={"fr"}, categories={"flowlane"},
        subresources={"status"}),
    "flowlane.dev/v1alpha1/flowservices": kmock.ResourceInfo(
        kind="FlowService", singular="flowservice", namespaced=True, shortnames={"fsvc"},
        categories={"flowlane"}, subresources={"status", "scale"}),
}
_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
_SUBRESOURCE_VERBS = {"get", "patch", "update"}


_resource_versions = itertools.count(1)
_event_seq = itertools.count(1)


# --- Pure helpers: selectors, JSONPath, ages, schemas, tables, OpenAPI ----------------------------------

def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """``a=b,c!=d,e,!f`` -> [(key, op, value)] with op one of ``=``, ``!=``, ``exists``, ``!exists``.

    Set-based terms (``env in (a,b)``) are not supported: they raise ``ValueError``.
    """
    terms: list[tuple[str, str, str]] = []
    for raw in filter(None, (term.strip() for term in text.split(","))):
        if re.search(r"\s(in|notin)\s|[()]", raw):
            raise ValueError(f"set-based selector terms are not supported by the emulator: {raw!r}")
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in raw:
            key, value = raw.split("==", 1) if "==" in raw else raw.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!exists", ""))
        else:
            terms.append((raw, "exists", ""))
    return terms


def selector_matches(terms: Sequence[tuple[str, str, str]], values: Mapping[str, str]) -> bool:
    """Whether ``values`` (labels, or fields like ``metadata.name``) satisfy every term."""
    for key, op, value in terms:
        present = key in values
        if (op == "=" and values.get(key) != value) or (op == "!=" and present and values[key] == value) \
                or (op == "exists" and not present) or (op == "!exists" and present):
            return False
    return True


def _object_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    """The fields every resource can be selected by: ``metadata.name`` and ``metadata.namespace``."""
    meta = obj.get("metadata", {})
    return {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace") or ""}


def jsonpath_value(obj: Any, path: str) -> Any:
    """The value at a simple JSONPath (``.status.phase``, ``.spec.tools[0].name``), None if absent."""
    for name, index in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", path):
        if name and isinstance(obj, Mapping):
            obj = obj.get(name)
        elif index and isinstance(obj, list) and int(index) < len(obj):
            obj = obj[int(index)]
        else:
            return None
    return obj


def human_duration(seconds: float) -> str:
    """An age as kubectl and the API server print it: 45s, 4m30s, 25m, 3h20m, 5d, 2y30d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """The age of an RFC 3339 timestamp (``<unknown>`` when there is none, as the API server says)."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration(((now or datetime.now(UTC)) - then).total_seconds())


def unknown_fields(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """The fields of ``value`` that a structural schema does not declare (what it would prune).

    An object schema declares its ``properties``, or any key through ``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields``. Only unknown fields are checked, not types or values.
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        keeps_any = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True \
            or schema.get("type") != "object"
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if item is None:  # a merge patch's deletion: nothing is stored
                continue
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], where)
            elif isinstance(extra, Mapping):
                found += unknown_fields(item, extra, where)
            elif not keeps_any:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def with_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` with a structural schema's defaults filled in, as the API server does before validating."""
    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        value = {**{k: p["default"] for k, p in properties.items() if "default" in p and k not in value}, **value}
        return {k: with_defaults(properties[k], v) if k in properties else v for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [with_defaults(schema["items"], v) for v in value]
    return value


@functools.cache
def _cel_program(rule: str) -> Any:
    import celpy  # the dev extra's cel-python; only CRDs with rules need it

    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def cel_violations(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    """``path: message`` for each ``x-kubernetes-validations`` rule ``value`` breaks, as the API server says it.

    Each rule runs on the node that declares it (``self``), after defaulting; the error names the
    node's path plus the rule's ``fieldPath``. CEL is evaluated by cel-python, without the
    Kubernetes extension libraries (those rules would fail to compile here).
    """
    import celpy

    if not path:
        value = with_defaults(schema, value)
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            found.append(f"{(path + rule.get('fieldPath', '')).lstrip('.')}: {rule['message']}")
    if isinstance(value, Mapping):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key, extra if isinstance(extra, Mapping) else None)
            if child is not None:
                found += cel_violations(child, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += cel_violations(schema["items"], item, f"{path}[{i}]")
    return found


@dataclass(frozen=True)
class Column:
    """One column of a server-side table (``metav1.TableColumnDefinition``) and how to fill it."""

    name: str
    type: str
    cell: Callable[[Mapping[str, Any]], Any]
    description: str = ""
    format: str = ""
    priority: int = 0

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "format": self.format,
                "description": self.description, "priority": self.priority}


def _name_column() -> Column:
    return Column("Name", "string", lambda o: o.get("metadata", {}).get("name"), format="name",
                  description="Name must be unique within a namespace.")


def _age_column() -> Column:
    return Column("Age", "string", lambda o: age(o.get("metadata", {}).get("creationTimestamp")),
                  description="Time since creation.")


def _printer_cell(kind: str, value: Any) -> Any:
    """A cell of a CRD printer column from the value its JSONPath found, as the API server converts it."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "integer" and isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "date" and isinstance(value, str):
        return age(value)
    return None


def crd_columns(printer_columns: Sequence[Mapping[str, Any]] | None) -> list[Column]:
    """The table of a custom resource: Name, then the version's ``additionalPrinterColumns``.

    Without printer columns a CRD gets Name and Age, as the API server does.
    """
    if printer_columns is None:
        printer_columns = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    def cell(path: str, kind: str) -> Callable[[Mapping[str, Any]], Any]:
        return lambda obj: _printer_cell(kind, jsonpath_value(obj, path))

    columns = [_name_column()]
    for spec in printer_columns:
        path, kind = spec["jsonPath"], spec["type"]
        columns.append(Column(
            spec["name"], kind, cell(path, kind),
            description=spec.get("description") or f"Custom resource definition column (in JSONPath format): {path}",
            format=spec.get("format", ""), priority=spec.get("priority", 0)))
    return columns


def _pod_status(pod: Mapping[str, Any]) -> str:
    status = pod.get("status", {})
    reason = status.get("reason") or status.get("phase") or ""
    for container in status.get("containerStatuses", []):
        state = container.get("state", {})
        reason = state.get("waiting", {}).get("reason") or state.get("terminated", {}).get("reason") or reason
    return "Terminating" if pod.get("metadata", {}).get("deletionTimestamp") else reason


def _pod_ready(pod: Mapping[str, Any]) -> str:
    ready = sum(bool(c.get("ready")) for c in pod.get("status", {}).get("containerStatuses", []))
    return f"{ready}/{len(pod.get('spec', {}).get('containers', []))}"


def _event_object(event: Mapping[str, Any]) -> str:
    involved = event.get("involvedObject", {})
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


#: Built-in kinds with printers of their own in a real API server; every other kind gets Name and Age.
BUILTIN_COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        _name_column(),
        Column("Ready", "string", _pod_ready, "The aggregate readiness state of this pod for accepting traffic."),
        Column("Status", "string", _pod_status, "The aggregate status of the containers in this pod."),
        Column("Restarts", "integer",
               lambda p: sum(c.get("restartCount", 0) for c in p.get("status", {}).get("containerStatuses", [])),
               "The number of times the containers in this pod have been restarted."),
        _age_column(),
    ],
    "Event": [
        Column("Last Seen", "string",
               lambda e: age(e.get("lastTimestamp") or e.get("eventTime")
                             or e.get("metadata", {}).get("creationTimestamp")),
               "Time since the event was last seen."),
        Column("Type", "string", lambda e: e.get("type"), "Type of this event (Normal, Warning)."),
        Column("Reason", "string", lambda e: e.get("reason"), "Why the action was taken."),
        Column("Object", "string", _event_object, "The object that this event is about."),
        Column("Message", "string", lambda e: e.get("message"), "A human-readable description of the status."),
    ],
    "Namespace": [
        _name_column(),
        Column("Status", "string", lambda n: n.get("status", {}).get("phase"), "The phase of the namespace."),
        _age_column(),
    ],
    "CustomResourceDefinition": [
        _name_column(),
        Column("Created At", "date", lambda o: o.get("metadata", {}).get("creationTimestamp"),
               "Time of creation."),
    ],
}


def table(columns: Sequence[Column], objects: Sequence[Mapping[str, Any]], resource_version: str,
          include_object: str = "Metadata") -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of ``objects``, what ``kubectl get`` asks the server for."""
    def row(obj: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {"cells": [column.cell(obj) for column in columns]}
        if include_object == "Object":
            result["object"] = obj
        elif include_object != "None":
            result["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                "metadata": obj.get("metadata", {})}
        return result

    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": [column.definition() for column in columns], "rows": [row(o) for o in objects]}


def _group_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def _openapi_path(group: str, version: str) -> str:
    """The key of a group-version in ``/openapi/v3``: ``api/v1``, ``apis/flowlane.dev/v1alpha1``."""
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _schema_name(group: str, version: str, kind: str) -> str:
    """``dev.flowlane.v1alpha1.FlowRun``, ``core.v1.Pod``: the reverse-domain names the API server uses."""
    return ".".join([*reversed(group.split(".")), version, kind]) if group else f"core.{version}.{kind}"


#: What kubectl looks for to send ``fieldValidation=Strict`` instead of validating on its own.
_FIELD_VALIDATION = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
                     "description": "Ignore, Warn or Strict: whether unknown fields fail the request."}


def openapi_group_version(group: str, version: str,
                          kinds: Sequence[tuple[str, str, bool, Mapping[str, Any] | None]]) -> dict[str, Any]:
    """The OpenAPI v3 document of one group-version: ``kinds`` is (plural, kind, namespaced, schema).

    A kind without a schema (the built-in kinds: the emulator has none of theirs) is declared to
    keep any field, and the server checks nothing else for it: the document says what is enforced.
    """
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    for plural, kind, namespaced, schema in kinds:
        gvk = {"group": group, "version": version, "kind": kind}
        name = _schema_name(group, version, kind)
        body = dict(copy.deepcopy(schema)) if schema else {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True,
            "description": f"{kind}: the emulator serves no schema for built-in kinds and keeps any field."}
        body["x-kubernetes-group-version-kind"] = [gvk]
        schemas[name] = body
        ref = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

        def operation(action: str, params: Sequence[Mapping[str, Any]] = (), ref: Any = ref,
                      gvk: Any = gvk, kind: str = kind) -> dict[str, Any]:
            return {"description": f"{action} {kind}", "operationId": f"{action}{kind}",
                    "parameters": list(params), "responses": {"200": {"description": "OK", **ref}},
                    "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}

        collection = f"{base}/namespaces/{{namespace}}/{plural}" if namespaced else f"{base}/{plural}"
        paths[collection] = {"get": operation("list"), "post": operation("post", [_FIELD_VALIDATION])}
        paths[f"{collection}/{{name}}"] = {
            "get": operation("get"), "put": operation("put", [_FIELD_VALIDATION]),
            "patch": operation("patch", [_FIELD_VALIDATION]), "delete": operation("delete")}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (the KMock emulator)", "version": "v1.26.4"},
            "paths": paths, "components": {"schemas": schemas}}


_CRD_RESOURCE = kmock.resource(group=CRDS.group, version=CRDS.version, plural=CRDS.plural)
_NAMESPACE_RESOURCE = kmock.resource(group="", version="v1", plural="namespaces")
_NAMESPACE_ACTIONS = {kmock.method.GET: kmock.action.FETCH, kmock.method.PATCH: kmock.action.UPDATE,
                      kmock.method.DELETE: kmock.action.DELETE}
_PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
                "application/strategic-merge-patch+json")


def _header(request: Any, name: str) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


def _resource_name(resource: Any) -> str:
    """``pods``, ``flowruns.flowlane.dev``: how the API server names a resource in its messages."""
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def strategic_as_merge(patch: Any) -> Any:
    """A strategic merge patch applied as a JSON merge patch (RFC 7386), in place.

    Enough for our objects: the emulator serves no patch strategies (no ``x-kubernetes-patch-merge-key``),
    so kubectl computes patches that replace lists whole, just as a merge patch does. The order
    hints (``$setElementOrder``, ``$retainKeys``) are dropped; directives that change what is
    stored (``$patch``, ``$deleteFromPrimitiveList``) are refused rather than misapplied.
    """
    if isinstance(patch, list):
        for item in patch:
            strategic_as_merge(item)
    elif isinstance(patch, dict):
        for key in list(patch):
            if key == "$patch" or key.startswith("$deleteFromPrimitiveList/"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message=(
                    f"strategic merge patch directive {key!r} is not supported by the emulator; "
                    "send a JSON patch (application/json-patch+json) instead"))
            if key == "$retainKeys" or key.startswith("$setElementOrder/"):
                del patch[key]
            else:
                strategic_as_merge(patch[key])
    return patch


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

    Lists honour label and field selectors and watches lose no events. A new object gets a uid, a
    creation time, generation 1 and a name from its ``generateName`` (kopf names its Kubernetes
    events that way); every write gets a fresh resourceVersion (kopf uses it to tell its own
    patches from stale watch events); a change of ``spec`` bumps ``metadata.generation``.

    For ``kubectl``: lists are typed (``FlowRunList``); a stored CustomResourceDefinition serves its
    resource (discovery, printer columns, OpenAPI schema); ``Accept: ...;as=Table`` gets a server-side
    table; PATCH takes JSON, merge and strategic-merge patches (the last applied as a merge patch,
    see ``strategic_as_merge``); PUT replaces; ``fieldValidation=Strict`` refuses fields the
    served schema does not declare; a created custom resource must pass its CRD's CEL rules
    (``cel_violations``). Not emulated: storing schema defaults, type validation,
    server-side apply, ``kubectl logs``/``exec``; listing or creating namespaces (KMock's path parser
    fails on ``/api/v1/namespaces``; every namespace is there and Active).
    """

    #: KMock matches each request against its reactions by scanning every request it recorded, so a
    #: session-long server slows down quadratically; only the newest requests are kept.
    keep_requests = 8

    #: When each object was first stored: (plural, namespace, name) -> time.monotonic() (benchmarks).
    created_at: dict[tuple[str, str, str], float] = {}  # noqa: RUF012  (one emulator per process)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = collections.defaultdict(_RecordingBus)
        self.static_resources: dict[str, kmock.ResourceInfo] = {}  # what serve_statically() declared
        #: API requests served, by (client, verb, resource): the client is the User-Agent's product
        #: (``flowlane-operator``, ``kopf``, ``kubectl``), the verb Kubernetes' (get, list, watch,
        #: create, update, patch, delete), the resource ``pods``, ``flowruns.flowlane.dev``,
        #: ``pods/status`` (``discovery`` for the API groups' resource lists). What an operator
        #: costs the API server, measured rather than guessed.
        self.request_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: Admission checks run on every create before anything is stored, as a ResourceQuota or an
        #: admission webhook does: one that raises ``kmock.KubernetesError`` refuses the create. (A
        #: KMock reaction cannot stand in: KMock stores a created object before its reactions answer.)
        self.admission: list[Callable[[Any], None]] = []

    def count_request(self, request: Any) -> None:
        if request.resource is None or request.action is None:
            return
        verb = {kmock.action.FETCH: "get", kmock.action.LIST: "list", kmock.action.WATCH: "watch",
                kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}.get(request.action)
        if verb is None:
            verb = "update" if request.method == kmock.method.PUT else "patch"
        resource = "discovery" if request.resource.plural is None else \
            _resource_name(request.resource) + (f"/{request.subresource}" if request.subresource else "")
        client = _header(request, "User-Agent").split("/", 1)[0].strip() or "unknown"
        self.request_counts[(client, verb, resource)] += 1

    def serve_statically(self, resources: Mapping[str, kmock.ResourceInfo]) -> None:
        """Serve these resources (``group/version/plural`` -> info) whether or not a CRD declares them."""
        for key, info in resources.items():
            served = copy.deepcopy(info)
            served.verbs = set(_VERBS)
            self.static_resources[key] = served
            self.resources[key] = served

    def _info(self, resource: Any) -> kmock.ResourceInfo | None:
        # ResourcesArray.get() would create the entry it looks for.
        return self.resources[resource] if resource in self.resources else None  # noqa: SIM401

    def _typed(self, resource: Any, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The object with its ``apiVersion`` and ``kind``, as a real API server always returns it."""
        info = self._info(resource)
        typed = {"apiVersion": _group_version(resource.group, resource.version)}
        if info is not None and info.kind:
            typed["kind"] = info.kind
        return {**typed, **obj}

    async def _handle(self, request: Any) -> Any:
        if len(self._requests) > 4 * self.keep_requests:
            del self._requests[: -self.keep_requests]
        if request.url.path == "/openapi/v3" or request.url.path.startswith("/openapi/v3/"):
            return aiohttp.web.json_response(self._serve_openapi(request.url.path))
        if request.url.path.startswith("/openapi/v2"):
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message="the emulator serves OpenAPI v3 only (/openapi/v3)")
        request = self._namespace_request(request)
        self.count_request(request)
        if request.resource is not None and request.method == kmock.method.PUT and request.name:
            return await self._serve_replace(request)
        data = request.data
        action = request.action
        if request.resource is not None and action == kmock.action.UPDATE:
            self._check_patch_type(request)
        if request.resource is not None and action == kmock.action.CREATE:
            self._check_rules(request)
            for admit in list(self.admission):
                admit(request)
        if request.resource is not None and action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._check_fields(request)
            version = str(next(_resource_versions))
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                if action == kmock.action.CREATE:
                    self._prepare_create(request, data)
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
        try:
            response = await super()._handle(request)
        except kmock.KubernetesObjectNotFoundError:  # KMock's own words name neither the resource nor the object
            raise self._not_found(request) from None
        except kmock.KubernetesResourceNotFoundError:
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message="the server could not find the requested resource") from None
        except kmock.KubernetesError as exc:
            if exc.status != 409:
                raise
            name = (data or {}).get("metadata", {}).get("name") if isinstance(data, dict) else request.name
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=(
                f'{_resource_name(request.resource)} "{name}" already exists')) from None
        if request.resource == _CRD_RESOURCE and action in (kmock.action.CREATE, kmock.action.UPDATE,
                                                             kmock.action.DELETE):
            name = request.name or data.get("metadata", {}).get("name")
            async with self._lock:
                await self._serve_crd(name)
        return response

    def _namespace_request(self, request: Any) -> Any:
        """``/api/v1/namespaces/NAME`` as the Namespace NAME: KMock's parser reads a namespace without a resource.

        (``/api/v1/namespaces`` itself fails in KMock's parser before any handler runs: namespaces
        cannot be listed or created.)
        """
        if request.resource is None or request.resource.group != "" or request.resource.plural is not None \
                or request.namespace is None or request.name is not None:
            return request
        namespace = attrs.evolve(request, resource=_NAMESPACE_RESOURCE, namespace=None, name=request.namespace,
                                 action=_NAMESPACE_ACTIONS.get(request.method))
        # Reactions match the requests KMock recorded, by identity: record this one in its place.
        self._requests[:] = [namespace if r is request else r for r in self._requests]
        return namespace

    def _not_found(self, request: Any) -> kmock.KubernetesError:
        resource = request.resource
        return kmock.KubernetesError(
            status=404, reason="NotFound", message=f'{_resource_name(resource)} "{request.name}" not found',
            details={"name": request.name, "group": resource.group, "kind": resource.plural})

    def _prepare_create(self, request: Any, data: dict[str, Any]) -> None:
        """What a real API server checks and fills in before it stores a new object."""
        meta = data["metadata"]
        info = self._info(request.resource)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid",
                                        message="metadata.name: Required value: name or generateName is required")
        if info is not None and info.namespaced and request.namespace:
            if meta.get("namespace", request.namespace) != request.namespace:
                raise kmock.KubernetesError(status=400, reason="BadRequest", message=(
                    "the namespace of the provided object does not match the namespace sent on the request"))
            meta["namespace"] = request.namespace
        if info is not None and info.kind:
            data.setdefault("apiVersion", _group_version(request.resource.group, request.resource.version))
            data.setdefault("kind", info.kind)
        if request.resource == _CRD_RESOURCE:
            spec = data.get("spec", {})
            names = spec.get("names", {})
            if meta["name"] != f"{names.get('plural')}.{spec.get('group')}":
                raise kmock.KubernetesError(status=422, reason="Invalid", message=(
                    f"metadata.name: Invalid value: {meta['name']!r}: must be spec.names.plural+\".\"+spec.group"))
            data["status"] = {
                "acceptedNames": names,
                "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
                               for t, r, m in [("NamesAccepted", "NoConflicts", "no conflicts found"),
                                               ("Established", "InitialNamesAccepted",
                                                "the initial names have been accepted")]],
                "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            }

    def _check_patch_type(self, request: Any) -> None:
        content_type = _header(request, "Content-Type").split(";")[0].strip()
        if content_type not in _PATCH_TYPES:
            raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message=(
                f"the body of the request was in an unknown format {content_type!r}: accepted media types "
                f"are {', '.join(_PATCH_TYPES)} (server-side apply is not emulated)"))
        if isinstance(request.data, list) != (content_type == "application/json-patch+json"):
            raise kmock.KubernetesError(status=400, reason="BadRequest",
                                        message=f"the body is not a valid {content_type} patch")
        if content_type == "application/strategic-merge-patch+json":
            strategic_as_merge(request.data)

    def _check_fields(self, request: Any) -> None:
        """``fieldValidation=Strict``: refuse the fields the served schema does not declare."""
        if request.params.get("fieldValidation") != "Strict" or not isinstance(request.data, dict):
            return
        schema = self._schema(request.resource)
        if schema is None:  # the OpenAPI document declares such kinds to keep any field
            return
        body = {k: v for k, v in request.data.items() if k not in ("apiVersion", "kind", "metadata")}
        unknown = unknown_fields(body, schema)
        if unknown:
            kind = (self._info(request.resource) or kmock.ResourceInfo()).kind
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=(
                f'{kind} in version "{request.resource.version}" cannot be handled as a {kind}: strict decoding '
                f"error: {', '.join(f'unknown field {f!r}'.replace(chr(39), chr(34)) for f in unknown)}"))

    def _check_rules(self, request: Any) -> None:
        """A CRD's CEL rules (``x-kubernetes-validations``) on a created object: 422 naming each field."""
        schema = self._schema(request.resource)
        if schema is None or not isinstance(request.data, dict):
            return
        violations = cel_violations(schema, request.data)
        if violations:
            kind = (self._info(request.resource) or kmock.ResourceInfo()).kind
            name = request.data.get("metadata", {}).get("name")
            raise kmock.KubernetesError(status=422, reason="Invalid", message=(
                f'{kind}.{request.resource.group} "{name}" is invalid: ' + ", ".join(violations)))

    async def _serve_replace(self, request: Any) -> Any:
        """PUT: the object (or its status, for ``/status``) replaced whole, as ``kubectl replace`` does."""
        key = (request.resource, request.namespace, request.name)
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="PUT needs a JSON object body")
        self._check_fields(request)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise self._not_found(request)
            current = copy.deepcopy(self.objects[key].raw)
            body = copy.deepcopy(request.data)
            meta = body.setdefault("metadata", {})
            if meta.get("resourceVersion") not in (None, current["metadata"].get("resourceVersion")):
                raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                    f'Operation cannot be fulfilled on {_resource_name(request.resource)} "{request.name}": the '
                    "object has been modified; please apply your changes to the latest version and try again"))
            if meta.get("name", request.name) != request.name:
                raise kmock.KubernetesError(status=400, reason="BadRequest",
                                            message="the name of the object does not match the name on the URL")
            info = self._info(request.resource)
            if request.subresource == "status":
                new = {**current, "status": body.get("status")}
            else:
                new = {**body, "metadata": {**meta, **{k: v for k, v in current["metadata"].items() if k in (
                    "name", "namespace", "uid", "creationTimestamp", "generation")}}}
                if info is not None and "status" in info.subresources:
                    new["status"] = current.get("status")
                if new.get("spec") != current.get("spec"):
                    new["metadata"]["generation"] = current["metadata"].get("generation", 0) + 1
            new = {k: v for k, v in self._typed(request.resource, new).items() if v is not None}
            new["metadata"]["resourceVersion"] = str(next(_resource_versions))
            self.objects[key].create(new)
            raw = self.objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        if request.resource == _CRD_RESOURCE:
            async with self._lock:
                await self._serve_crd(request.name)
        return aiohttp.web.json_response(raw)

    # --- CustomResourceDefinitions ------------------------------------------------------------------

    def _crd(self, resource: Any) -> dict[str, Any] | None:
        key = (_CRD_RESOURCE, None, _resource_name(resource))
        if resource.group and key in self.objects and not self.objects[key].deleted:
            return cast(dict[str, Any], self.objects[key].raw)
        return None

    def _crd_version(self, resource: Any) -> dict[str, Any] | None:
        crd = self._crd(resource)
        versions = crd.get("spec", {}).get("versions", []) if crd else []
        return next((v for v in versions if v.get("name") == resource.version), None)

    def _schema(self, resource: Any) -> dict[str, Any] | None:
        """The stored CRD's ``openAPIV3Schema`` for this resource's version, if a CRD declares it."""
        version = self._crd_version(resource)
        return version.get("schema", {}).get("openAPIV3Schema") if version else None

    async def _serve_crd(self, name: str) -> None:
        """Serve what the stored CRD ``name`` declares; a deleted CRD serves only what was static.

        Called under the emulator's lock, after the write that stored or deleted the CRD.
        """
        key = (_CRD_RESOURCE, None, name)
        crd = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
        plural, _, group = name.partition(".")
        for resource in [r for r in self.resources if r.group == group and r.plural == plural]:
            path = f"{group}/{resource.version}/{plural}"
            if path in self.static_resources:
                self.resources[path] = self.static_resources[path]
            else:
                del self.resources[path]
        if crd is None:  # its objects go with it, as with a real API server
            for obj_key in [k for k in self.objects if k[0].group == group and k[0].plural == plural]:
                if not self.objects[obj_key].deleted:
                    await self._buses[obj_key[0]].put({"type": "DELETED", "object": self.objects[obj_key].raw})
                del self.objects[obj_key]
            return
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec.get("versions", []):
            if version.get("served", True):
                self.resources[f"{group}/{version['name']}/{plural}"] = kmock.ResourceInfo(
                    kind=names["kind"], singular=names.get("singular") or names["kind"].lower(),
                    namespaced=spec.get("scope") == "Namespaced", verbs=set(_VERBS),
                    shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
                    subresources=set(version.get("subresources") or {}))

    # --- Discovery and OpenAPI ----------------------------------------------------------------------

    async def _serve_version(self, request: Any) -> Any:
        """KMock's resource list with the core group's ``groupVersion`` right (``v1``, not ``/v1``).

        kubectl cannot map any core resource (pods, events) from ``/v1``.
        """
        payload: dict[str, Any] = await super()._serve_version(request)  # type: ignore[assignment]
        payload["groupVersion"] = _group_version(request.resource.group, request.resource.version)
        for entry in payload["resources"]:
            sub = "/" in entry["name"]
            entry["verbs"] = sorted(_SUBRESOURCE_VERBS if sub else entry["verbs"])
            if sub:
                entry["shortNames"], entry["categories"] = [], []
        payload["resources"].sort(key=lambda entry: entry["name"])
        return payload

    def _serve_openapi(self, path: str) -> dict[str, Any]:
        """``/openapi/v3`` (an index of group-versions) and ``/openapi/v3/<apis/group/version>``."""
        kinds: dict[tuple[str, str], list[tuple[str, str, bool, Mapping[str, Any] | None]]] = \
            collections.defaultdict(list)
        for resource in self.resources:
            info = self.resources[resource]
            group, version, plural = str(resource.group), str(resource.version), str(resource.plural)
            kinds[group, version].append((plural, info.kind or plural.capitalize(), bool(info.namespaced),
                                          self._schema(resource)))
        docs = {_openapi_path(group, version): openapi_group_version(group, version, sorted(entries))
                for (group, version), entries in kinds.items()}
        if path.rstrip("/") == "/openapi/v3":
            return {"paths": {key: {"serverRelativeURL": f"/openapi/v3/{key}?hash=" + hashlib.sha512(
                json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()} for key, doc in sorted(docs.items())}}
        key = path.removeprefix("/openapi/v3/")
        if key not in docs:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=f"no OpenAPI v3 document for {key}")
        return docs[key]

    # --- Reading: watches, lists, objects, tables ---------------------------------------------------

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
        obj = event.get("object", {})
        meta = obj.get("metadata", {})
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        return bool(check(request, request.resource, meta.get("namespace"), meta.get("name"), strict=False)) \
            and self._selected(request, obj)

    def _selected(self, request: Any, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` passes the request's ``labelSelector`` and ``fieldSelector``."""
        try:
            labels = parse_selector(request.params.get("labelSelector") or "")
            fields = parse_selector(request.params.get("fieldSelector") or "")
        except ValueError as exc:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=str(exc)) from None
        return selector_matches(labels, obj.get("metadata", {}).get("labels") or {}) \
            and selector_matches(fields, _object_fields(obj))

    def _table(self, request: Any, objects: Sequence[Mapping[str, Any]], resource_version: str) -> dict[str, Any]:
        version = self._crd_version(request.resource)
        info = self._info(request.resource)
        columns = crd_columns(version.get("additionalPrinterColumns")) if version else \
            BUILTIN_COLUMNS.get(info.kind if info and info.kind else "", [_name_column(), _age_column()])
        return table(columns, objects, resource_version, request.params.get("includeObject", "Metadata"))

    async def _serve_list(self, request: Any) -> Any:
        """Typed lists (``kind: FlowRunList``), sorted by namespace and name, selectors honoured."""
        payload: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        version = str(cast(_RecordingBus, self._buses[request.resource]).last_seq)
        items = sorted((i for i in payload["items"] if self._selected(request, i)), key=lambda i: (
            i.get("metadata", {}).get("namespace") or "", i.get("metadata", {}).get("name") or ""))
        items = [self._typed(request.resource, i) for i in items]
        if "as=Table;v=v1;" in _header(request, "Accept").replace(" ", "") + ";":
            return self._table(request, items, version)
        info = self._info(request.resource)
        return {"apiVersion": _group_version(request.resource.group, request.resource.version),
                "kind": f"{info.kind}List" if info and info.kind else "List",
                "metadata": {"resourceVersion": version}, "items": items}

    async def _serve_fetch(self, request: Any) -> Any:
        """The object; a namespace nobody created is Active, since every namespace takes objects here."""
        try:
            obj = self._typed(request.resource, await super()._serve_fetch(request))  # type: ignore[arg-type]
        except kmock.KubernetesObjectNotFoundError:
            if request.resource != _NAMESPACE_RESOURCE:
                raise
            obj = self._typed(request.resource, {"metadata": {"name": request.name},
                                                 "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        if "as=Table;v=v1;" in _header(request, "Accept").replace(" ", "") + ";":
            return self._table(request, [obj], obj.get("metadata", {}).get("resourceVersion", ""))
        return obj


class KMockServer:
    """KMock's Kubernetes emulator on a port of its own, served from a background thread.

    ``host`` is the address to listen on: loopback by default; a bridge's gateway address (or
    ``0.0.0.0``) lets containers on that network reach it. ``port`` None picks a free one.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port
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
        async with ApiServerEmulator() as emulator, \
                kmock.Server(emulator, host=self.host, port=self.port) as server:
            emulator.serve_statically(_RESOURCES)
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


def write_kubeconfig(path: Path, url: str, namespace: str) -> Path:
    """A kubeconfig at ``path`` for ``url`` (no TLS; any token) whose context defaults to ``namespace``."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock", "preferences": {},
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
    }, indent=2))
    return path


def find_kubectl() -> str | None:
    """The kubectl beside this interpreter (the venv's), else the one on PATH."""
    return shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@dataclass
class Kubectl:
    """The real kubectl on a kubeconfig: ``kubectl("get", "flowruns")`` -> CompletedProcess.

    ``check`` (the default) fails the test with kubectl's stderr when it exits non-zero. Discovery
    and OpenAPI caches live under ``cache_dir``, never the user's ~/.kube.
    """

    kubeconfig: Path
    cache_dir: Path
    binary: str
    timeout_s: float = 30.0

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.cache_dir)}
        result = subprocess.run([self.binary, f"--cache-dir={self.cache_dir}", *args], input=input, env=env,
                                capture_output=True, text=True, timeout=self.timeout_s, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result


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
    saved: dict[str, Progress] = field(default_factory=dict)  # what a checkpoint request answers, per run
    checkpointed: list[str] = field(default_factory=list)  # the runs asked to checkpoint, in order

    def set(self, run: str, progress: Progress) -> None:
        self.values[run] = progress

    async def __call__(self, run: RunRef) -> Progress | None:
        self.asked.append(run)
        return self.values.get(run.name)

    async def checkpoint(self, run: RunRef, timeout_s: float) -> Progress | None:
        """The learner's answer to a checkpoint request: ``saved[run]``, which then is its progress too."""
        self.checkpointed.append(run.name)
        if run.name in self.saved:
            self.values[run.name] = self.saved[run.name]
        return self.saved.get(run.name)


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
def kubectl(kube: KubeApi, tmp_path: Path) -> Kubectl:
    """The real kubectl against the session's KMock server, in the test's namespace."""
    binary = find_kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed (beside the interpreter or on PATH)")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.url, kube.namespace)
    return Kubectl(kubeconfig, tmp_path / "kube-cache", binary)


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


__all__ = ["CONFIG_MAPS", "CRDS", "DEPLOYMENTS", "EVENTS", "FLOWRUNS", "FLOWSERVICES", "NETWORK_POLICIES", "PODS",
           "SECRETS", "SERVICES", "ApiServerEmulator", "FakeProgress", "KMockServer", "KubeApi", "Kubectl",
           "OperatorThread", "cel_violations", "find_kubectl", "human_duration", "wait_until", "with_defaults",
           "write_kubeconfig"]
