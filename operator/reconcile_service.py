"""What one reconcile of a FlowService decides: pure, like ``reconcile.py``'s FlowRun planning.

``plan_flowservice`` resolves the checkpoint to serve (a URI, or the best or latest checkpoint of
a FlowRun), renders the gateway Deployment and Service, and reports readiness from the
Deployment's status; the shell in ``kube_reconciler.py`` applies the ``Plan`` it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from flowlane.api.common import InvalidResourceError, set_condition, validate_resource
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import FlowRun
from flowlane.api.flowservice import KIND as FLOWSERVICE_KIND
from flowlane.api.flowservice import (
    CheckpointChoice,
    FlowService,
    FlowServiceStatus,
    ServiceConditionType,
    ServicePhase,
)
from flowlane.operator.reconcile import (
    Event,
    EventType,
    Plan,
    _status_data,
    _sync_static,
    apply_cluster_defaults,
    flowrun_object,
    parse_run_status,
)
from flowlane.operator.render import ANNOTATION_CHECKPOINT, RenderOptions
from flowlane.operator.render_service import render_flowservice, s3_env, service_endpoint
from flowlane.operator.settings import ClusterDefaults


@dataclass
class ServiceChildren:
    deployment: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    flowrun: dict[str, Any] | None = None  # the FlowRun named by spec.model.flowRun, if any
    missing_secrets: list[str] = field(default_factory=list)


def parse_service_status(raw: Any) -> FlowServiceStatus:
    if not isinstance(raw, Mapping):
        return FlowServiceStatus()
    try:
        return FlowServiceStatus.model_validate(raw)
    except ValidationError:
        return FlowServiceStatus()


def plan_flowservice(body: Mapping[str, Any], children: ServiceChildren, now: datetime,
                     options: RenderOptions, defaults: ClusterDefaults) -> Plan:
    """Decide one reconcile of a FlowService: resolve the checkpoint, render, report readiness."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
    old = parse_service_status(body.get("status"))
    new = old.model_copy(deep=True)
    new.observed_generation = generation
    plan = Plan(status={})

    def condition(type_: ServiceConditionType, status: bool, reason: str, message: str = "") -> None:
        new.conditions = set_condition(new.conditions, type_.value, status, reason, message, now, generation)

    def phase(value: ServicePhase, message: str, reason: str, warning: bool = False) -> Plan:
        new.phase = value
        new.message = message
        if old.phase != value or (warning and old.message != message):
            plan.events.append(Event(EventType.WARNING if warning else EventType.NORMAL, reason, message))
        plan.status = _status_data(new)
        return plan

    try:
        fsvc = validate_resource(FlowService, {**flowrun_object(body), "kind": FLOWSERVICE_KIND},
                                 FLOWSERVICE_KIND, "spec")
    except InvalidResourceError as exc:
        message = "; ".join(exc.problems)
        condition(ServiceConditionType.ACCEPTED, False, "InvalidSpec", message)
        return phase(ServicePhase.FAILED, message, "InvalidSpec", warning=True)
    condition(ServiceConditionType.ACCEPTED, True, "Valid")
    new.endpoint = service_endpoint(fsvc)

    # Which checkpoint, and how to read it.
    source = fsvc.spec.model
    checkpoint: str | None = source.uri
    storage = fsvc.spec.storage
    unresolved = ""
    trained_min_turns: int | None = None  # the served FlowRun's algorithm.minTurns
    if source.flow_run is not None:
        ref = source.flow_run
        if children.flowrun is None:
            unresolved = f"FlowRun {ref.name!r} not found in namespace {fsvc.namespace}"
        else:
            run_status = parse_run_status(children.flowrun.get("status"))
            checkpoint = run_status.best_checkpoint if ref.checkpoint is CheckpointChoice.BEST \
                else run_status.last_checkpoint
            if checkpoint is None:
                unresolved = f"FlowRun {ref.name!r} has no {ref.checkpoint.value} checkpoint yet"
            try:
                run = apply_cluster_defaults(
                    validate_resource(FlowRun, flowrun_object(children.flowrun), FLOWRUN_KIND, "flowRun"), defaults)
                storage = run.spec.storage
                trained_min_turns = run.spec.algorithm.min_turns
            except InvalidResourceError:
                storage = None
    current = children.deployment
    current_checkpoint = (current or {}).get("metadata", {}).get("annotations", {}).get(ANNOTATION_CHECKPOINT)
    if unresolved:
        condition(ServiceConditionType.CHECKPOINT_RESOLVED, False, "CheckpointUnavailable", unresolved)
        checkpoint = current_checkpoint  # keep serving what is served
    else:
        condition(ServiceConditionType.CHECKPOINT_RESOLVED, True, "Resolved", checkpoint or "")
    if checkpoint is None:
        condition(ServiceConditionType.READY, False, "CheckpointUnavailable", unresolved)
        return phase(ServicePhase.PENDING, unresolved, "CheckpointUnavailable")
    if children.missing_secrets:
        message = "; ".join(children.missing_secrets)
        condition(ServiceConditionType.READY, False, "SecretNotFound", message)
        if current is None:
            return phase(ServicePhase.PENDING, message, "SecretNotFound", warning=True)

    env = s3_env(storage.s3_endpoint, storage.credentials_secret) if storage and checkpoint.startswith("s3://") \
        else []
    claim = None
    if storage and storage.volume_claim_name and (storage.checkpoint_uri or "").startswith("file://"):
        claim = (storage.volume_claim_name, str(storage.checkpoint_uri).removeprefix("file://"))
    rendered = render_flowservice(fsvc, checkpoint=checkpoint, storage_env=env, options=options,
                                  checkpoint_volume=claim, trained_min_turns=trained_min_turns)
    observed = [o for o in (children.deployment, children.service) if o is not None]
    _sync_static(rendered.children(), observed, plan)
    new.desired_checkpoint = checkpoint
    if checkpoint != current_checkpoint and current is not None:
        plan.events.append(Event(EventType.NORMAL, "RollingToCheckpoint", f"rolling the gateway pods to {checkpoint}"))

    # Readiness from the Deployment's status (after an update, once the controller has seen it).
    dep_status = (current or {}).get("status") or {}
    want = fsvc.spec.replicas
    new.replicas = int(dep_status.get("replicas") or 0)
    new.ready_replicas = int(dep_status.get("readyReplicas") or 0)
    new.updated_replicas = int(dep_status.get("updatedReplicas") or 0)
    dep_generation = (current or {}).get("metadata", {}).get("generation")
    seen = dep_generation is None or int(dep_status.get("observedGeneration") or 0) >= dep_generation
    rolled_out = (current is not None and current_checkpoint == checkpoint and seen
                  and new.updated_replicas >= want and new.ready_replicas >= want
                  and not any(obs is current for obs, _ in plan.update))
    if rolled_out:
        new.served_checkpoint = checkpoint
        message = f"{new.ready_replicas}/{want} replicas serve {checkpoint}"
        condition(ServiceConditionType.READY, True, "Serving", message)
        return phase(ServicePhase.READY, message, "Serving")
    if new.ready_replicas == 0:
        new.served_checkpoint = None
    message = f"{new.ready_replicas}/{want} replicas ready, {new.updated_replicas} on {checkpoint}"
    condition(ServiceConditionType.READY, new.ready_replicas > 0, "Progressing", message)
    return phase(ServicePhase.PENDING if new.ready_replicas == 0 else ServicePhase.PROGRESSING, message, "Progressing")
