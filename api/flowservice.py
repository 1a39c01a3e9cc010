"""The FlowService resource: an AgentFlow agent served behind an OpenAI-compatible API.

A FlowService names where the planner comes from (a FlowRun's latest or best checkpoint, or a
model URI), how many gateway replicas serve it, with which tools, and which Secret holds the
bearer token clients must send. The operator renders a Deployment of gateway pods and a Service in
front of them; when the FlowRun writes a newer checkpoint the Deployment rolls to it without
downtime, and ``status.servedCheckpoint`` says which one answers requests right now.

Spec and status are separate types; the CRD schema is generated from these classes.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Final, Literal

from pydantic import ConfigDict, Field, model_validator

from flowlane.api.common import (
    DNS_LABEL_PATTERN,
    GROUP_VERSION,
    Condition,
    ObjectMeta,
    PodTemplate,
    Quantity,
    Resources,
    SecretKeyRef,
    SpecModel,
    field_error,
    load_resource,
)
from flowlane.api.enums import Dtype, EngineKind, LocalEngineKind
from flowlane.api.flowrun import ModelVolume, StorageSpec, ToolSpec, default_tools

KIND: Final = "FlowService"
PLURAL: Final = "flowservices"
DEFAULT_PORT = 8000


class CheckpointChoice(enum.StrEnum):
    LATEST = "latest"  # the FlowRun's newest complete checkpoint (status.lastCheckpoint)
    BEST = "best"  # the checkpoint at the best held-out accuracy (status.bestCheckpoint)


class ServicePhase(enum.StrEnum):
    PENDING = "Pending"  # waiting for a checkpoint or for the first replica to become ready
    PROGRESSING = "Progressing"  # rolling to a new checkpoint or scaling
    READY = "Ready"  # every replica serves the desired checkpoint
    FAILED = "Failed"  # invalid spec


class ServiceConditionType(enum.StrEnum):
    ACCEPTED = "Accepted"
    CHECKPOINT_RESOLVED = "CheckpointResolved"
    READY = "Ready"


class FlowRunModelRef(SpecModel):
    """Serve a checkpoint of a FlowRun in the same namespace."""

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, description="FlowRun name.")
    checkpoint: CheckpointChoice = Field(CheckpointChoice.LATEST, description="latest or best.")


class ModelSource(SpecModel):
    """Where the served planner comes from: exactly one of flowRun or uri."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "has(self.flowRun) != has(self.uri)",
        "message": "set exactly one of model.flowRun or model.uri",
    }]})

    flow_run: FlowRunModelRef | None = Field(
        None, description="A FlowRun whose checkpoint is served; new checkpoints roll the pods."
    )
    uri: str | None = Field(
        None, min_length=1,
        description="A model: known name, local directory in the image, or s3:// checkpoint/model URI.",
    )
    fixed: str | None = Field(
        None, min_length=1, description="Model behind the executor, verifier and generator; default: the planner."
    )
    dtype: Dtype = Field(Dtype.AUTO, description="Weight dtype of the serving engine.")
    volume: ModelVolume | None = Field(
        None, description="A PersistentVolumeClaim with model directories, mounted read-only in the gateway pods; "
        "name a model inside it by path in uri.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.flow_run is None) == (self.uri is None):
            raise field_error("flowRun", "set exactly one of model.flowRun or model.uri")
        return self


class GatewayEngineSpec(SpecModel):
    """Inference engine of the gateway pods."""

    kind: LocalEngineKind = Field(EngineKind.VLLM, description="vllm or transformers.")
    max_model_len: int = Field(4096, ge=256, le=1048576, description="Context length.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="GPU memory fraction for vLLM.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one engine is sharded over.")


class AgentLimits(SpecModel):
    """Per-request budgets of the agent loop."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        # 10: maxTurns' default (below), as the CEL sees an object without it
        "rule": "!has(self.minTurns) || self.minTurns <= (has(self.maxTurns) ? self.maxTurns : 10)",
        "message": "minTurns must be <= maxTurns",
        "fieldPath": ".minTurns",
    }]})

    max_turns: int = Field(10, ge=1, le=64, description="Planner turn budget per request.")
    min_turns: int | None = Field(
        None, ge=1, le=64,
        description="Planner turns before the verifier is first asked to stop; a request asking for fewer "
        "max_turns gets that many. Default: the FlowRun's algorithm.minTurns when model.flowRun is set (serve the "
        "planner as it was trained), else 1.",
    )
    timeout_seconds: float = Field(
        120.0, gt=0.0, le=3600.0,
        description="Time limit per request; at the limit the agent answers with what it has (finish_reason "
                    "time_limit).")
    max_concurrent_requests: int = Field(
        16, ge=1, le=4096, description="Requests a replica runs at once; one more gets 429 with Retry-After.")
    history_max_tokens: int = Field(
        1024, ge=16, le=1048576,
        description="Tokens of a request's conversation (system message, earlier turns, question) in each module "
                    "prompt; the oldest turns are dropped to fit. Must leave 2560 tokens of engine.maxModelLen.")

    @model_validator(mode="after")
    def _turn_floor_within_budget(self) -> AgentLimits:
        if self.min_turns is not None and self.min_turns > self.max_turns:
            raise field_error("minTurns", f"must be <= maxTurns ({self.max_turns}), got {self.min_turns}")
        return self

    def turn_floor(self, trained_with: int | None = None) -> int:
        """The gateway's --min-turns: minTurns, else the FlowRun's ``trained_with``, else 1; <= maxTurns."""
        floor = self.min_turns if self.min_turns is not None else trained_with or 1
        return min(floor, self.max_turns)


class GatewayResources(Resources):
    """Compute for one gateway replica (its engine holds the planner and the fixed model)."""

    cpu: Quantity = Field("2", description="CPU request and limit per replica (Kubernetes quantity).")
    memory: Quantity = Field("8Gi", description="Memory request and limit per replica (Kubernetes quantity).")


class FlowServiceSpec(SpecModel):
    """The desired serving deployment."""

    model: ModelSource = Field(..., description="The planner to serve and the fixed-module model.")
    replicas: int = Field(1, ge=0, le=1024, description="Gateway replicas.")
    resources: GatewayResources = Field(default_factory=GatewayResources, description="Per-replica compute.")
    tools: list[ToolSpec] = Field(
        default_factory=default_tools,
        max_length=64,
        description="Tools the served agent may call.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    auth: SecretKeyRef | None = Field(
        None, description="Secret key with the bearer token clients must send; none: no auth (in-cluster only)."
    )
    engine: GatewayEngineSpec = Field(default_factory=GatewayEngineSpec, description="Serving engine settings.")
    agent: AgentLimits = Field(default_factory=AgentLimits, description="Per-request agent budgets.")
    storage: StorageSpec | None = Field(
        None, description="S3 endpoint and credentials for an s3:// model.uri; a flowRun source uses the FlowRun's."
    )
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="HTTP port of the gateway and its Service.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate, description="Labels, annotations, priority class, scheduler, service account "
        "and pull secrets of every gateway pod.",
    )


class FlowServiceStatus(SpecModel):
    """What the operator observed. Written only by the operator."""

    phase: ServicePhase | None = Field(None, description="Pending, Progressing, Ready or Failed.")
    message: str | None = Field(None, description="One line on the current phase.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Accepted, CheckpointResolved, Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status reflects.")
    replicas: int = Field(0, ge=0, description="Gateway pods that exist.")
    ready_replicas: int = Field(0, ge=0, description="Gateway pods ready to serve.")
    updated_replicas: int = Field(0, ge=0, description="Gateway pods on the desired checkpoint.")
    desired_checkpoint: str | None = Field(None, description="The checkpoint the gateway pods are rolling to.")
    served_checkpoint: str | None = Field(None, description="The checkpoint every ready replica serves.")
    endpoint: str | None = Field(None, description="In-cluster OpenAI-compatible base URL.")


class FlowService(SpecModel):
    """A FlowService object: ``apiVersion``, ``kind``, ``metadata``, ``spec`` and ``status``."""

    api_version: Literal["flowlane.dev/v1alpha1"] = Field(
        GROUP_VERSION, alias="apiVersion", description="flowlane.dev/v1alpha1"
    )
    kind: Literal["FlowService"] = Field(KIND, description="FlowService")
    metadata: ObjectMeta = Field(..., description="Standard object metadata.")
    spec: FlowServiceSpec = Field(..., description="The desired serving deployment.")
    status: FlowServiceStatus | None = Field(None, description="Observed state, written by the operator.")

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


def load_flowservice(source: str | Path) -> FlowService:
    """Read a FlowService from a YAML file path or YAML text; errors name their field paths."""
    return load_resource(FlowService, source, KIND)
