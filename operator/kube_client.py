"""A small async Kubernetes REST client: as little of the API as the operator needs.

kopf keeps its own client private, so the operator talks to the API server through this one,
logged in with the same credentials kopf uses. Here: ``Kind`` (where a resource's objects live in
the REST API) and the kinds the operator reads and writes, ``ApiError``, and ``KubeClient``.
Nothing here knows about FlowRuns beyond their kinds' names: what to read and write is decided in
``kube_reconciler.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from flowlane import __version__
from flowlane.api.flowrun import PLURAL as FLOWRUN_PLURAL
from flowlane.api.flowservice import PLURAL as FLOWSERVICE_PLURAL

logger = logging.getLogger("flowlane.operator")

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


__all__ = [
    "CONFIG_MAPS", "DEPLOYMENTS", "DISRUPTION_BUDGETS", "FLOWRUNS", "FLOWSERVICES", "KINDS_BY_OBJECT",
    "NETWORK_POLICIES", "NODES", "PODS", "REJECTION_STATUSES", "SECRETS", "SERVICES", "USER_AGENT", "ApiError",
    "Kind", "KubeClient", "kind_of",
]
