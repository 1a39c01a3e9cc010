"""What one reconcile of a FlowRun or FlowService decides: pure functions, no I/O.

The operator is level-triggered. Whatever woke it up (a resource created or edited, one of its pods
changing, the periodic timer, the operator restarting), a reconcile reads the resource, its
children and the learner's progress, and hands them to ``plan_flowrun`` (here) or
``plan_flowservice`` (``reconcile_service.py``; what each pod's status says is read by ``pods.py``).
These return a ``Plan``: the status to write, children to create, update or delete, and events to
post. The shell in ``kube_reconciler.py`` applies it in a crash-safe order: status first, then deletions,
then creations.

Writing the status first is what makes restarts exact: a group restart records the new
``restartCount`` before any pod is deleted, and every pod is labelled with the count (the *epoch*)
it was created for. If the operator dies in between, the next reconcile sees pods of an old epoch
and deletes them without counting the restart again. Children have deterministic names, so a
create that already happened is skipped: reconciling twice never duplicates anything.

Semantics (those of the best training operators; render.py says why pods are bare Pods): a failed
learner or rollout pod restarts the whole group from the latest checkpoint until ``backoffLimit``
restarts are used up; a sandbox is stateless and is replaced alone; ``suspend: true`` deletes the
pods and keeps everything else; ``activeDeadlineSeconds`` counts from the (last) start;
``ttlSecondsAfterFinished`` deletes the finished FlowRun; a spec change that alters a pod rolls the
group. A spec the operator cannot run (a cross-field error, storage that does not survive a
restart) sets ``Failed`` with a reason that says what to change and is re-checked on every
reconcile, so fixing the spec starts the run; a missing Secret keeps the run ``Pending`` with the
Secret's name until someone creates it. Everything here is total: a malformed object yields a
Failed status, never an exception.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from flowlane.api.common import (
    GROUP_VERSION,
    InvalidResourceError,
    S3CredentialsSecret,
    get_condition,
    set_condition,
    validate_resource,
)
from flowlane.api.flowrun import KIND as FLOWRUN_KIND
from flowlane.api.flowrun import ConditionType, FlowRun, FlowRunStatus, Phase
from flowlane.api.flowservice import FlowServiceStatus
from flowlane.operator.graph import Role, SecretEnv
from flowlane.operator.pods import (
    object_name,
    pod_disrupted,
    pod_epoch,
    pod_failure,
    pod_kueue_evicted,
    pod_node,
    pod_phase,
    pod_queued,
    pod_stuck_terminating,
    pod_terminating,
    pod_unschedulable,
    pod_up,
    pod_waiting,
)
from flowlane.operator.render import (
    ANNOTATION_HASH,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_QUEUE_LABEL,
    RenderOptions,
    child_name,
    render_flowrun,
)
from flowlane.operator.settings import ClusterDefaults


@dataclass(frozen=True)
class Progress:
    """What the learner reports about its run; None fields are unknown."""

    step: int | None = None
    total_steps: int | None = None
    policy_version: int | None = None
    reward: float | None = None
    held_out_accuracy: float | None = None  # the test split after training
    baseline_accuracy: float | None = None  # the test split before training
    validation_accuracy: float | None = None  # the latest score of the validation split
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None  # the checkpoint with the best validation score
    best_validation_accuracy: float | None = None
    mlflow_run_id: str | None = None
    finished: bool = False  # the learner finished every step
    #: Rollout worker name -> the policy version of its latest trajectory (None: the learner does not say).
    worker_policy_versions: Mapping[str, int] | None = None
    staleness: int | None = None  # policy_version minus the oldest worker's version
    last_weight_sync_seconds: float | None = None


@dataclass(frozen=True)
class RunRef:
    """Where to ask a running FlowRun's learner for progress."""

    namespace: str
    name: str
    learner_address: str  # host:port
    token: SecretEnv


class ProgressSource(Protocol):
    """Where progress comes from: the learner's status RPC, or whatever a test feeds."""

    async def __call__(self, run: RunRef) -> Progress | None: ...

    async def checkpoint(self, run: RunRef, timeout_s: float) -> Progress | None:
        """Have the learner checkpoint its last completed step now; the progress after it, None if it did not."""
        ...


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Plan:
    """What one reconcile does. Applied in order: status, delete, update, create."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    update: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (observed, desired)
    delete: list[dict[str, Any]] = field(default_factory=list)
    create_token_secret: bool = False
    events: list[Event] = field(default_factory=list)
    delete_self: bool = False
    #: Pods stuck Terminating on a lost node: deleted with grace period 0 (their kubelet is gone).
    force_delete: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunChildren:
    """The children of one FlowRun as read from the API, and the Secrets it references."""

    pods: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    config_maps: list[dict[str, Any]] = field(default_factory=list)
    network_policies: list[dict[str, Any]] = field(default_factory=list)
    disruption_budgets: list[dict[str, Any]] = field(default_factory=list)
    token_secret_exists: bool = True
    missing_secrets: list[str] = field(default_factory=list)
    #: Creates the API server refused last time (a quota, an admission webhook), one line each.
    rejected: list[str] = field(default_factory=list)
    #: Nodes of this run's pods that are NotReady or gone (read only for pods stuck Terminating).
    lost_nodes: frozenset[str] = frozenset()


def preempted_before(status: FlowRunStatus) -> bool:
    """Whether the run is suspended because Kueue preempted it (until its group is re-admitted and runs)."""
    cond = get_condition(status.conditions, ConditionType.SUSPENDED.value)
    return cond is not None and cond.status == "True" and cond.reason == "Preempted"


def kueue_preempted(body: Mapping[str, Any], pods: list[dict[str, Any]]) -> bool:
    """Kueue is stopping the current group and the run has not yet been suspended for it."""
    status = parse_run_status(body.get("status"))
    return not preempted_before(status) and any(
        pod_epoch(p) == status.restart_count and pod_kueue_evicted(p) for p in pods)


def parse_run_status(raw: Any) -> FlowRunStatus:
    """The stored status, tolerating garbage: whatever cannot be read starts fresh."""
    if not isinstance(raw, Mapping):
        return FlowRunStatus()
    try:
        return FlowRunStatus.model_validate(raw)
    except ValidationError:
        restarts = raw.get("restartCount")
        return FlowRunStatus(restart_count=restarts if isinstance(restarts, int) and restarts >= 0 else 0)


def apply_cluster_defaults(flowrun: FlowRun, defaults: ClusterDefaults) -> FlowRun:
    """Fill storage and tracking the FlowRun leaves unset from the operator's cluster defaults."""
    storage = flowrun.spec.storage
    updates: dict[str, Any] = {}
    uri = storage.checkpoint_uri
    if uri is None and defaults.checkpoint_uri:
        uri = f"{defaults.checkpoint_uri.rstrip('/')}/{flowrun.namespace}/{flowrun.name}"
        updates["checkpoint_uri"] = uri
    if uri and uri.startswith("s3://"):
        if storage.s3_endpoint is None and defaults.s3_endpoint:
            updates["s3_endpoint"] = defaults.s3_endpoint
        if storage.credentials_secret is None and defaults.s3_credentials_secret:
            updates["credentials_secret"] = S3CredentialsSecret(name=defaults.s3_credentials_secret)
    spec_updates: dict[str, Any] = {}
    if updates:
        spec_updates["storage"] = storage.model_copy(update=updates)
    if flowrun.spec.tracking.mlflow_uri is None and defaults.mlflow_uri:
        spec_updates["tracking"] = flowrun.spec.tracking.model_copy(update={"mlflow_uri": defaults.mlflow_uri})
    if not spec_updates:
        return flowrun
    return flowrun.model_copy(update={"spec": flowrun.spec.model_copy(update=spec_updates)})


def placement_problems(flowrun: FlowRun) -> list[str]:
    """What keeps a valid FlowRun from running correctly on Kubernetes, as ``path: fix`` lines."""
    storage = flowrun.spec.storage
    uri = storage.checkpoint_uri
    if uri is None:
        return ["spec.storage.checkpointUri: required on Kubernetes (the operator has no default): set an "
                "s3:// URI (MinIO works), or a file:/// path with storage.volumeClaimName; files inside a pod "
                "do not survive the group restarts that resume from checkpoints"]
    if uri.startswith("file://") and storage.volume_claim_name is None:
        return [f"spec.storage.volumeClaimName: required for checkpointUri {uri} on Kubernetes: name a "
                "PersistentVolumeClaim to mount there, or use an s3:// checkpointUri; files inside a pod do "
                "not survive the group restarts that resume from checkpoints"]
    return []


def referenced_secrets(flowrun: FlowRun) -> list[tuple[str, str]]:
    """(Secret name, the field that references it) for every Secret the pods will read."""
    refs: list[tuple[str, str]] = []
    if flowrun.spec.storage.credentials_secret is not None:
        refs.append((flowrun.spec.storage.credentials_secret.name, "spec.storage.credentialsSecret"))
    if flowrun.spec.grpc_auth is not None:
        refs.append((flowrun.spec.grpc_auth.name, "spec.grpcAuth"))
    for i, tool in enumerate(flowrun.spec.tools):
        if tool.credentials_secret is not None:
            refs.append((tool.credentials_secret.name, f"spec.tools[{i}].credentialsSecret"))
    return refs


def flowrun_object(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion", GROUP_VERSION), "kind": body.get("kind", FLOWRUN_KIND),
            "metadata": body.get("metadata", {}), "spec": body.get("spec", {})}


def _status_data(status: FlowRunStatus | FlowServiceStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _sync_static(desired: list[dict[str, Any]], observed: list[dict[str, Any]], plan: Plan) -> None:
    """Create missing children; update those whose rendered hash changed."""
    by_name = {(o["kind"], object_name(o)): o for o in observed}
    for obj in desired:
        current = by_name.get((obj["kind"], object_name(obj)))
        if current is None:
            plan.create.append(obj)
        elif current.get("metadata", {}).get("annotations", {}).get(ANNOTATION_HASH) != \
                obj["metadata"]["annotations"][ANNOTATION_HASH]:
            plan.update.append((current, obj))


class _RunStatus:
    """A FlowRun status being rewritten during one plan, with the events its transitions cause."""

    def __init__(self, old: FlowRunStatus, generation: int | None, now: datetime) -> None:
        self.old = old
        self.new = old.model_copy(deep=True)
        self.new.observed_generation = generation
        self.generation = generation
        self.now = now
        self.events: list[Event] = []
        self.preempted = preempted_before(old)  # suspended by a Kueue preemption, waiting for re-admission

    def condition(self, type_: ConditionType, status: bool, reason: str, message: str = "") -> None:
        self.new.conditions = set_condition(self.new.conditions, type_.value, status, reason, message,
                                            self.now, self.generation)

    def clear(self, type_: ConditionType, reason: str, message: str = "") -> None:
        """Set a condition to False if it was ever set (conditions appear once relevant)."""
        if get_condition(self.new.conditions, type_.value) is not None:
            self.condition(type_, False, reason, message)

    def phase(self, phase: Phase, message: str, reason: str, warning: bool = False) -> None:
        self.new.phase = phase
        self.new.message = message
        if self.old.phase != phase:
            self.events.append(Event(EventType.WARNING if warning else EventType.NORMAL, reason, message))

    def not_running(self, reason: str, message: str, phase_reason: str) -> None:
        """Ready and Running false for ``reason``; Pending, unless a group restart is in progress
        (its phase stays, with this message)."""
        self.condition(ConditionType.READY, False, reason, message)
        self.condition(ConditionType.RUNNING, False, reason, message)
        if self.preempted:  # stays Suspended until the re-admitted group runs
            self.new.message = f"preempted; {message}"
        elif self.new.phase is not Phase.RESTARTING:
            self.phase(Phase.PENDING, message, phase_reason)
        else:
            self.new.message = message

    def finish(self, phase: Phase, reason: str, message: str) -> None:
        failed = phase is Phase.FAILED
        self.phase(phase, message, reason, warning=failed)
        self.new.completion_time = self.new.completion_time or self.now
        self.condition(ConditionType.FAILED if failed else ConditionType.SUCCEEDED, True, reason, message)
        self.condition(ConditionType.READY, False, reason, message)
        self.clear(ConditionType.RESTARTING, reason)


def plan_flowrun(body: Mapping[str, Any], children: RunChildren, progress: Progress | None, now: datetime,
                 options: RenderOptions, defaults: ClusterDefaults) -> Plan:
    """Decide everything one reconcile of a FlowRun does; pure and total (never raises on bad input)."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
    st = _RunStatus(parse_run_status(body.get("status")), generation, now)
    live_pods = [p for p in children.pods if not pod_terminating(p)]
    # Pods still holding resources; finished pods are kept for `kubectl logs` until the group restarts.
    active_pods = [p for p in live_pods if pod_phase(p) not in ("Succeeded", "Failed")]
    plan = Plan(status={})

    def done() -> Plan:
        plan.status = _status_data(st.new)
        plan.events = st.events
        return plan

    # Succeeded and Failed are final, except a Failed for an invalid spec: that one is re-checked
    # every time, so fixing the spec starts the run.
    old_failed = get_condition(st.old.conditions, ConditionType.FAILED.value)
    invalid_before = st.old.phase is Phase.FAILED and old_failed is not None and old_failed.reason == "InvalidSpec"
    if st.old.phase is not None and st.old.phase.finished and not invalid_before:
        plan.delete += active_pods
        ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
        if isinstance(ttl, int) and st.new.completion_time is not None \
                and now >= st.new.completion_time + timedelta(seconds=ttl):
            plan.delete_self = True
        return done()

    try:
        flowrun = apply_cluster_defaults(
            validate_resource(FlowRun, flowrun_object(body), FLOWRUN_KIND, "spec"), defaults)
        problems = placement_problems(flowrun)
    except InvalidResourceError as exc:
        problems = exc.problems
    if problems:
        message = "; ".join(problems)
        st.condition(ConditionType.ACCEPTED, False, "InvalidSpec", message)
        st.finish(Phase.FAILED, "InvalidSpec", message)
        plan.delete += active_pods
        return done()
    if invalid_before:  # the spec was fixed: start over
        st.new.completion_time = None
        st.new.conditions = [c for c in st.new.conditions if c.type != ConditionType.FAILED.value]
    st.condition(ConditionType.ACCEPTED, True, "Valid")

    # Progress first: it can finish the run.
    if progress is not None:
        _apply_progress(st.new, progress)
    if st.new.last_checkpoint:
        at = f" (step {st.new.step})" if st.new.step is not None else ""
        st.condition(ConditionType.CHECKPOINTED, True, "CheckpointWritten", f"{st.new.last_checkpoint}{at}")

    spec = flowrun.spec
    rendered = render_flowrun(flowrun, epoch=st.new.restart_count, options=options)
    if progress is not None:
        _weights_synced(st, progress, [c.name for c in rendered.graph.components if c.role is Role.ROLLOUT])
    _sync_static(rendered.static_children(),
                 [*children.config_maps, *children.services, *children.network_policies,
                  *children.disruption_budgets], plan)
    plan.create_token_secret = rendered.token_secret_name is not None and not children.token_secret_exists

    if spec.suspend:
        plan.delete += live_pods
        st.new.start_time = None  # like a Job: the deadline counts from the resume
        st.condition(ConditionType.SUSPENDED, True, "Suspended", "spec.suspend is true: pods stopped")
        st.condition(ConditionType.READY, False, "Suspended", "spec.suspend is true")
        st.clear(ConditionType.RUNNING, "Suspended", "spec.suspend is true")
        st.clear(ConditionType.ADMITTED, "Suspended", "spec.suspend is true: no pods are asked for")
        st.phase(Phase.SUSPENDED, "suspended: pods stopped, checkpoints kept; set spec.suspend=false to resume",
                 "Suspended")
        return done()
    suspended = get_condition(st.new.conditions, ConditionType.SUSPENDED.value)
    if suspended is not None and suspended.status == "True" and not st.preempted:
        st.clear(ConditionType.SUSPENDED, "Resumed")  # spec.suspend went back to false

    deadline = spec.active_deadline_seconds
    if deadline is not None and st.new.start_time is not None \
            and now >= st.new.start_time + timedelta(seconds=deadline):
        plan.delete += active_pods
        st.finish(Phase.FAILED, "DeadlineExceeded",
                  f"active for more than activeDeadlineSeconds ({deadline}s); raise it to let runs go on longer")
        return done()

    learner_name = child_name(flowrun.name, rendered.graph.lead_learner)  # rank 0 finishes the run
    learner = next((p for p in live_pods if object_name(p) == learner_name), None)
    if (learner is not None and pod_phase(learner) == "Succeeded") or (progress is not None and progress.finished):
        plan.delete += active_pods
        st.finish(Phase.SUCCEEDED, "Completed", f"finished {st.new.step or spec.schedule.steps} steps")
        return done()

    epoch = st.new.restart_count
    # Kueue preempted the group: it has checkpointed (the shell asked the learner first); stop every
    # pod and wait, suspended, for re-admission. No restart is counted: the run did nothing wrong.
    preempted = [why for p in children.pods if pod_epoch(p) == epoch and (why := pod_kueue_evicted(p))]
    if preempted:
        plan.delete += live_pods
        st.new.start_time = None  # as for spec.suspend: the deadline counts from the resume
        kept = (f"checkpoint {st.new.last_checkpoint} (step {st.new.step}) kept" if st.new.last_checkpoint
                else "no checkpoint yet: the run starts over")
        message = f"preempted by Kueue ({preempted[0]}); {kept}; it resumes when Kueue re-admits the pod group"
        st.condition(ConditionType.SUSPENDED, True, "Preempted", message)
        st.condition(ConditionType.READY, False, "Preempted", message)
        st.clear(ConditionType.RUNNING, "Preempted", message)
        st.condition(ConditionType.ADMITTED, False, "Preempted", preempted[0])
        st.phase(Phase.SUSPENDED, message, "Preempted", warning=True)
        return done()
    services_by_name = {child_name(flowrun.name, c.name): c.service for c in rendered.graph.components}
    # A pod on a lost node stays Terminating and keeps its name: free the name for its replacement.
    plan.force_delete = [p for p in children.pods if pod_terminating(p) and pod_node(p) in children.lost_nodes
                         and pod_stuck_terminating(p, now)]
    failed = [p for p in live_pods if pod_phase(p) == "Failed" and pod_epoch(p) == epoch
              and not services_by_name.get(object_name(p), False)]
    # A member of the current group evicted (its node lost, a preemption, a drain) is lost as
    # surely as a failed one; Kubernetes marks such deletions with the DisruptionTarget condition.
    evicted = [p for p in children.pods if pod_terminating(p) and pod_epoch(p) == epoch and pod_disrupted(p)
               and pod_phase(p) not in ("Succeeded", "Failed") and not services_by_name.get(object_name(p), False)]
    if failed or evicted:
        reason = pod_failure(failed[0]) if failed else f"pod {object_name(evicted[0])} was evicted" + (
            f" from node {pod_node(evicted[0])}" if pod_node(evicted[0]) else "")
        if epoch >= spec.backoff_limit:
            plan.delete += active_pods
            st.finish(Phase.FAILED, "BackoffLimitExceeded",
                      f"{reason}; restarted {epoch} times (backoffLimit {spec.backoff_limit}): fix the cause and "
                      "recreate the FlowRun, which resumes from the latest checkpoint")
            return done()
        st.new.restart_count = epoch + 1
        plan.delete += live_pods
        st.condition(ConditionType.RESTARTING, True, "PodFailed", reason)
        st.condition(ConditionType.READY, False, "PodFailed", reason)
        st.clear(ConditionType.RUNNING, "PodFailed", reason)
        message = f"{reason}; restarting the group ({st.new.restart_count}/{spec.backoff_limit})"
        if st.old.phase is Phase.RESTARTING:  # no phase change, but every restart gets its event
            st.events.append(Event(EventType.WARNING, "GroupRestart", message))
        st.phase(Phase.RESTARTING, message, "GroupRestart", warning=True)
        return done()

    # Pods of an older epoch, with an outdated spec, or failed stateless sandboxes are replaced.
    desired = {object_name(p): p for p in rendered.pods}
    stale: list[dict[str, Any]] = []
    rolled = False
    for pod in live_pods:
        want = desired.get(object_name(pod))
        if want is None or pod_epoch(pod) != epoch or pod_phase(pod) == "Failed":
            stale.append(pod)
        elif pod.get("metadata", {}).get("annotations", {}).get(ANNOTATION_HASH) != \
                want["metadata"]["annotations"][ANNOTATION_HASH]:
            stale.append(pod)
            rolled = True
    plan.delete += stale
    if rolled:
        st.condition(ConditionType.RESTARTING, True, "SpecChanged", "the spec changed: rolling the pods")
        st.phase(Phase.RESTARTING, "the spec changed: recreating the pods with it", "SpecChanged")

    if children.missing_secrets:
        message = "; ".join(children.missing_secrets)
        st.condition(ConditionType.READY, False, "SecretNotFound", message)
        if st.new.phase not in (Phase.RESTARTING,):
            st.phase(Phase.PENDING, message, "SecretNotFound", warning=True)
        return done()

    present = {object_name(p) for p in children.pods}
    plan.create += [pod for name, pod in desired.items() if name not in present]
    if plan.create and st.new.start_time is None and any(p["kind"] == "Pod" for p in plan.create):
        st.new.start_time = now

    stale_names = {object_name(p) for p in stale}
    running = [p for p in live_pods if object_name(p) in desired and object_name(p) not in stale_names
               and pod_up(p)]
    queued = [p for p in live_pods if pod_queued(p)]
    _group_conditions(st, flowrun.name, desired, present, running, children.rejected, bool(queued),
                      rendered.graph.lead_learner)
    if len(running) == len(desired) and not plan.create:
        st.condition(ConditionType.READY, True, "AllPodsRunning", f"{len(desired)} pods running")
        st.condition(ConditionType.RUNNING, True, "AllPodsRunning", f"{len(desired)} pods running")
        st.clear(ConditionType.RESTARTING, "GroupRunning")
        if st.preempted:
            st.clear(ConditionType.SUSPENDED, "Readmitted", "Kueue re-admitted the pod group")
        st.phase(Phase.RUNNING, f"{len(desired)} pods running", "Running")
    elif queued:
        labels = queued[0].get("metadata", {}).get("labels", {})
        message = (f"waiting for Kueue to admit pod group {labels.get(KUEUE_POD_GROUP_LABEL, '?')} from queue "
                   f"{labels.get(KUEUE_QUEUE_LABEL, '?')}: {len(queued)}/{len(desired)} pods held")
        st.not_running("Queued", message, "Queued")
    elif children.rejected:
        message = "the API server refused pods: " + "; ".join(children.rejected)
        old_admitted = get_condition(st.old.conditions, ConditionType.ADMITTED.value)
        if old_admitted is None or old_admitted.message != "; ".join(children.rejected):
            st.events.append(Event(EventType.WARNING, "CreateRejected", message))
        st.not_running("CreateRejected", message, "CreateRejected")
    elif unplaced := [(object_name(p), why) for p in live_pods if (why := pod_unschedulable(p)) is not None]:
        # No gang scheduler: the pods placed already run, but the run is no more than Pending until the
        # whole group is placed, and says which pods wait and what the scheduler said of each.
        message = (f"waiting for the whole group: the scheduler cannot place {len(unplaced)} of {len(desired)} pods: "
                   + "; ".join(f"{name.removeprefix(flowrun.name + '-')}: {why}" for name, why in sorted(unplaced)))
        old_ready = get_condition(st.old.conditions, ConditionType.READY.value)
        if old_ready is None or old_ready.reason != "Unschedulable" or old_ready.message != message:
            st.events.append(Event(EventType.WARNING, "Unschedulable", message))
        st.not_running("Unschedulable", message, "Unschedulable")
    else:
        stuck = [w for p in live_pods if (w := pod_waiting(p))]
        waiting = sorted(set(desired) - {object_name(p) for p in running})
        message = "; ".join(stuck) if stuck else "waiting for pods: " + ", ".join(
            n.removeprefix(flowrun.name + "-") for n in waiting)
        old_ready = get_condition(st.old.conditions, ConditionType.READY.value)
        if stuck and (old_ready is None or old_ready.reason != "PodsStuck" or old_ready.message != message):
            st.events.append(Event(EventType.WARNING, "PodsStuck", message))
        st.not_running("PodsStuck" if stuck else "PodsNotRunning", message, "Pending")
    return done()


def _group_conditions(st: _RunStatus, run: str, desired: Mapping[str, Any], present: set[str],
                      running: list[dict[str, Any]], rejected: list[str], queued: bool,
                      lead_learner: str = "learner") -> None:
    """Admitted (the API server took every pod, and Kueue, if queued, let them run) and
    RolloutDegraded (the learner runs, a worker does not)."""
    if rejected:
        st.condition(ConditionType.ADMITTED, False, "CreateRejected", "; ".join(rejected))
    elif queued:
        st.condition(ConditionType.ADMITTED, False, "Queued", "the pod group waits in its Kueue queue")
    elif desired and set(desired) <= present:
        st.condition(ConditionType.ADMITTED, True, "PodsCreated", f"the API server took all {len(desired)} pods")
    up = {object_name(p) for p in running}
    learner = child_name(run, lead_learner)
    workers = sorted(n for n in desired if n.startswith(child_name(run, "rollout-")))
    down = [n.removeprefix(run + "-") for n in workers if n not in up]
    if learner in up and down:
        st.condition(ConditionType.ROLLOUT_DEGRADED, True, "WorkersNotRunning",
                     f"{len(down)}/{len(workers)} rollout workers not running: {', '.join(down)}")
    elif learner in up:
        st.clear(ConditionType.ROLLOUT_DEGRADED, "AllWorkersRunning", f"{len(workers)} rollout workers running")


def _apply_progress(status: FlowRunStatus, progress: Progress) -> None:
    # The best checkpoint is the learner's choice, by validation score: the test split is scored only
    # after training, so it can never select among checkpoints.
    for name in ("step", "total_steps", "policy_version", "reward", "held_out_accuracy", "baseline_accuracy",
                 "validation_accuracy", "last_checkpoint", "best_checkpoint", "best_validation_accuracy",
                 "mlflow_run_id", "staleness", "last_weight_sync_seconds"):
        value = getattr(progress, name)
        if value is not None:
            setattr(status, name, value)
    if progress.worker_policy_versions is not None:  # the learner's whole map: a restarted worker drops out
        status.worker_policy_versions = dict(sorted(progress.worker_policy_versions.items()))


def _weights_synced(st: _RunStatus, progress: Progress, workers: list[str]) -> None:
    """WeightsSynced: every rollout worker samples with the learner's current policy version."""
    versions, current = progress.worker_policy_versions, progress.policy_version
    if versions is None or current is None:
        return  # a learner that does not report per-worker versions: no claim either way
    missing = [w for w in workers if w not in versions]
    # Ahead counts too: a learner restored from an older checkpoint is not what that worker samples with.
    behind = [w for w in workers if w in versions and versions[w] != current]
    if missing:
        st.condition(ConditionType.WEIGHTS_SYNCED, False, "WorkerMissing",
                     f"no trajectory since (re)start from {', '.join(missing)}; the learner is at version {current}")
    elif behind:
        st.condition(ConditionType.WEIGHTS_SYNCED, False, "WorkersBehind",
                     ", ".join(f"{w} at version {versions[w]}" for w in behind)
                     + f"; the learner is at version {current}")
    else:
        st.condition(ConditionType.WEIGHTS_SYNCED, True, "AllWorkersSynced",
                     f"{len(workers)} rollout workers on policy version {current}")
