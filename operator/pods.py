"""Reading a pod as the kubelet, the scheduler, Kueue and the node lifecycle controller leave it: pure.

The FlowRun planner (``reconcile.py``) asks these what became of each pod of a run: up, failed
(and why), stuck (and why), evicted, preempted by Kueue, unschedulable, held in a queue, stuck
Terminating on a lost node. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from flowlane.operator.render import KUEUE_ADMISSION_GATE, LABEL_EPOCH


def object_name(obj: Mapping[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def pod_up(pod: Mapping[str, Any]) -> bool:
    """Running with no container waiting (a crash-looping container keeps its pod Running), or done."""
    phase = pod_phase(pod)
    if phase == "Succeeded":
        return True
    containers = (pod.get("status") or {}).get("containerStatuses") or []
    return phase == "Running" and not any((c.get("state") or {}).get("waiting") for c in containers)


def pod_terminating(pod: Mapping[str, Any]) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


#: How long past its deletion deadline (deletionTimestamp: the deletion plus the grace period) a
#: pod on a lost node may stay Terminating before it is force-deleted.
FORCE_DELETE_AFTER_S = 30.0


def pod_stuck_terminating(pod: Mapping[str, Any], now: datetime) -> bool:
    """Terminating and past its deletion deadline by FORCE_DELETE_AFTER_S: its kubelet did not finish."""
    deadline = pod.get("metadata", {}).get("deletionTimestamp")
    try:
        when = datetime.fromisoformat(str(deadline).replace("Z", "+00:00"))
    except ValueError:
        return False
    return now >= when + timedelta(seconds=FORCE_DELETE_AFTER_S)


def pod_disrupted(pod: Mapping[str, Any]) -> bool:
    """Deleted by a disruption (node lost, eviction, preemption): its DisruptionTarget condition is True."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def pod_node(pod: Mapping[str, Any]) -> str | None:
    node = (pod.get("spec") or {}).get("nodeName")
    return node if isinstance(node, str) and node else None


def pod_epoch(pod: Mapping[str, Any]) -> int | None:
    value = pod.get("metadata", {}).get("labels", {}).get(LABEL_EPOCH)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def pod_failure(pod: Mapping[str, Any]) -> str:
    """Why a pod failed, in one line: reason and exit code of its container, or the pod's reason."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            detail = terminated.get("reason") or "Error"
            return f"pod {object_name(pod)} failed: {detail} (exit code {terminated.get('exitCode')})"
    reason = status.get("reason") or "Failed"
    message = f": {status['message']}" if status.get("message") else ""
    return f"pod {object_name(pod)} failed: {reason}{message}"


_STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                  "CreateContainerError", "CrashLoopBackOff"}


def pod_waiting(pod: Mapping[str, Any]) -> str | None:
    """A reason a pending pod is not starting that a user can act on, or None."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_REASONS:
            text = f"{object_name(pod)}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
            # A crash loop's cause is in the last run's termination message (its last log line
            # with terminationMessagePolicy FallbackToLogsOnError), not in the back-off message.
            last = ((container.get("lastState") or {}).get("terminated") or {})
            if waiting["reason"] == "CrashLoopBackOff" and last.get("message"):
                text += f"; last exit {last.get('exitCode')}: {str(last['message']).strip()[:300]}"
            return text
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            return f"{object_name(pod)}: {cond['reason']}: {cond.get('message', '')}".rstrip(": ")
    return None


#: The pod condition Kueue's plain-Pod integration sets on every pod of a workload it evicts
#: (preempted, deactivated, PodsReady timed out) just before it deletes them; the reason says which
#: (WorkloadEvictedDueToPreempted, ...). Kueue then requeues the workload: pods created again under
#: the same pod-group name are held until it re-admits the group.
KUEUE_TERMINATION_TARGET = "TerminationTarget"


def pod_kueue_evicted(pod: Mapping[str, Any]) -> str | None:
    """Why Kueue stopped the pod ("reason: message" of its TerminationTarget condition), or None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == KUEUE_TERMINATION_TARGET and cond.get("status") == "True":
            reason = str(cond.get("reason") or "Evicted")
            return f"{reason}: {cond['message']}" if cond.get("message") else reason
    return None


def pod_unschedulable(pod: Mapping[str, Any]) -> str | None:
    """What the scheduler said of a pod it cannot place (PodScheduled False, Unschedulable), or None."""
    if pod_phase(pod) != "Pending":
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
            return str(cond.get("message") or "Unschedulable")
    return None


def pod_queued(pod: Mapping[str, Any]) -> bool:
    """Whether Kueue still holds the pod (its admission scheduling gate is on)."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return any(isinstance(g, Mapping) and g.get("name") == KUEUE_ADMISSION_GATE for g in gates)
