"""How the operator is configured, observed and connected: settings, metrics, logs, login.

Everything about *running* the operator (as opposed to what it does with a FlowRun) lives here:

- ``OperatorConfig``: scope (some namespaces or the whole cluster), the health and metrics
  ports, images and cluster-wide defaults for the pods it renders, reconcile timing. Read from
  the environment the Helm chart sets (``FLOWLANE_*``), overridable by CLI flags and tests.
- ``OperatorMetrics``: Prometheus counters and histograms of reconciles (count, latency, errors,
  group restarts), in a registry of its own so several operators in one test process never clash.
- ``kopf_settings``: kopf's knobs with flowlane's choices (annotation-based progress storage so
  the status holds only what flowlane writes, a flowlane finalizer, warnings posted as events).
- ``connection``: the Kubernetes API endpoint and credentials, shared by kopf and the operator's
  own API client (in-cluster service account, a kubeconfig, or an explicit server for tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from pydantic import BaseModel, ConfigDict, Field

from flowlane import __version__
from flowlane.kit import logs
from flowlane.kit.logs import LogFormat
from flowlane.operator.render import RenderOptions

FINALIZER = "flowlane.dev/cleanup"
ANNOTATION_PREFIX = "flowlane.dev"


class ClusterDefaults(BaseModel):
    """Values applied to FlowRuns/FlowServices that leave them unset (the chart's ``defaults``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_uri: str | None = Field(default=None, description="Base URI; a run uses <base>/<namespace>/<name>.")
    s3_endpoint: str | None = None
    s3_credentials_secret: str | None = Field(default=None, description="Secret with keys accessKey and secretKey.")
    mlflow_uri: str | None = None


class OperatorConfig(BaseModel):
    """Everything the operator process is told at start."""

    model_config = ConfigDict(extra="forbid")

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to serve; empty: all.")
    health_port: int | None = Field(8080, description="Port of the /healthz endpoint; None: no endpoint.")
    metrics_port: int | None = Field(9090, description="Port of the Prometheus /metrics endpoint; None: off.")
    log_level: str = "info"
    log_format: LogFormat = LogFormat.JSON
    render: RenderOptions = Field(default_factory=RenderOptions)
    defaults: ClusterDefaults = Field(default_factory=lambda: ClusterDefaults())
    reconcile_interval_s: float = Field(10.0, gt=0, description="Periodic re-check of every resource.")
    progress_timeout_s: float = Field(3.0, gt=0, description="Timeout of one learner status query.")
    server: str | None = Field(None, description="API server URL; None: in-cluster or kubeconfig.")
    insecure: bool = Field(False, description="Skip TLS verification of the API server (tests only).")
    token: str | None = None
    standalone: bool = Field(True, description="Run without kopf peering (the chart runs one replica).")
    scanning: bool = Field(
        True, description="Watch for CRDs and namespaces appearing at runtime; off: discover once at start."
    )
    explicit_cleanup: bool = Field(
        True, description="Delete children on FlowRun deletion instead of relying only on the garbage collector."
    )

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        return f"http://0.0.0.0:{self.health_port}/healthz" if self.health_port else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> OperatorConfig:
        """Read the ``FLOWLANE_*`` variables the Helm chart sets; ``overrides`` (CLI flags) win."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        version_tag = f":{__version__}"
        render = RenderOptions(
            learner_image=get("FLOWLANE_LEARNER_IMAGE") or "ghcr.io/flowlane/flowlane-learner" + version_tag,
            rollout_image=get("FLOWLANE_ROLLOUT_IMAGE") or "ghcr.io/flowlane/flowlane-rollout" + version_tag,
            sandbox_image=get("FLOWLANE_SANDBOX_IMAGE") or "ghcr.io/flowlane/flowlane-sandbox" + version_tag,
            gateway_image=get("FLOWLANE_GATEWAY_IMAGE") or "ghcr.io/flowlane/flowlane-gateway" + version_tag,
            gpu_resource_name=get("FLOWLANE_GPU_RESOURCE_NAME") or "nvidia.com/gpu",
            image_pull_secrets=tuple(n.strip() for n in (get("FLOWLANE_IMAGE_PULL_SECRETS") or "").split(",")
                                     if n.strip()),
        )
        defaults = ClusterDefaults(
            checkpoint_uri=get("FLOWLANE_DEFAULT_CHECKPOINT_URI"),
            s3_endpoint=get("FLOWLANE_S3_ENDPOINT"),
            s3_credentials_secret=get("FLOWLANE_S3_CREDENTIALS_SECRET"),
            mlflow_uri=get("FLOWLANE_DEFAULT_MLFLOW_URI"),
        )
        values: dict[str, Any] = {"render": render, "defaults": defaults}
        if get("FLOWLANE_LOG_LEVEL"):
            values["log_level"] = get("FLOWLANE_LOG_LEVEL")
        if get("FLOWLANE_LOG_FORMAT"):
            values["log_format"] = get("FLOWLANE_LOG_FORMAT")
        # A namespace-scoped install (a Role, not a ClusterRole) may not list namespaces or CRDs.
        if get("FLOWLANE_RESOURCE_SCANNING"):
            values["scanning"] = get("FLOWLANE_RESOURCE_SCANNING") not in ("0", "false", "no", "off")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def kopf_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    # Handler progress and the last-handled spec live in annotations: the status subresource holds
    # only what flowlane writes, and the CRD's status schema prunes nothing kopf needs.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Only explicit kopf.event() calls become Kubernetes events, not every log line.
    settings.posting.loggers = False
    # A deletion waits for the resource's timer to exit; when the timer is mid-reconcile (or is the
    # one deleting the resource, for ttlSecondsAfterFinished) kopf re-checks after this long.
    settings.background.cancellation_polling = 1.0
    settings.peering.standalone = config.standalone
    settings.scanning.disabled = not config.scanning
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    return settings


def configure_logging(config: OperatorConfig) -> None:
    """flowlane's one log format (``flowlane.kit.logs``); kopf's object references become ``object``."""
    level = config.log_level.lower()
    # kopf's own setup first: it quiets asyncio's debug chatter; kit.logs then replaces its handler.
    kopf.configure(debug=level == "debug", verbose=level == "debug", quiet=level in ("warning", "error"))
    logs.configure("operator", log_format=config.log_format, level=config.log_level)


def connection(config: OperatorConfig, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """API endpoint and credentials: an explicit server, else the service account, else kubeconfig."""
    if config.server:
        return kopf.ConnectionInfo(server=config.server, insecure=config.insecure or None,
                                   token=config.token, scheme="Bearer" if config.token else None)
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


class OperatorMetrics:
    """Prometheus metrics of one operator instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "flowlane_operator_reconciles", "Reconciles finished, by resource kind and result.",
            ["kind", "result"], registry=self.registry,
        )
        self.latency = Histogram(
            "flowlane_operator_reconcile_seconds", "Wall time of one reconcile, by resource kind.",
            ["kind"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.errors = Counter(
            "flowlane_operator_reconcile_errors", "Reconciles that raised, by resource kind and error.",
            ["kind", "error"], registry=self.registry,
        )
        self.group_restarts = Counter(
            "flowlane_operator_group_restarts", "Whole-group restarts of FlowRuns after a pod failure.",
            registry=self.registry,
        )

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Current value of a sample (tests and the health probe)."""
        return self.registry.get_sample_value(name, dict(labels or {})) or 0.0

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
