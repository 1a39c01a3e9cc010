"""The isolation layers: which a run can have, which are mandatory, and which to ask for.

What each layer stops, and where each is enforced, is in ``runner``'s module docstring; this module
holds only the names, the mandatory set and the request (:class:`Isolation`), so that the sandbox
server, the code tool and ``flowlane run``'s pre-flight check can name layers without the runner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from flowlane.runtime.sandbox import child


class IsolationLayer(StrEnum):
    """The independent protections a run can have (see ``runner``'s module docstring)."""

    RLIMITS = "rlimits"
    UNPRIVILEGED_UID = "unprivileged_uid"
    NO_NEW_PRIVS = "no_new_privs"
    NETWORK_NAMESPACE = "network_namespace"
    PRIVATE_TMP = "private_tmp"
    AUDIT_HOOK = "audit_hook"
    SECCOMP = "seccomp"
    LANDLOCK = "landlock"
    PROCESS_TRACKING = "process_tracking"
    NON_DUMPABLE_CALLER = "non_dumpable_caller"


#: Layers a run that executes model code for a FlowRun or FlowService must have, wherever it runs
#: (they need no privileges); ``unprivileged_uid`` joins them when the caller is root. The sandbox
#: server refuses to start without them unless told otherwise (``allowWeakIsolation``).
MANDATORY_LAYERS = frozenset({
    IsolationLayer.RLIMITS, IsolationLayer.NO_NEW_PRIVS, IsolationLayer.SECCOMP, IsolationLayer.LANDLOCK,
    IsolationLayer.PROCESS_TRACKING, IsolationLayer.NON_DUMPABLE_CALLER,
})


def missing_mandatory_layers(layers: tuple[IsolationLayer, ...], *, as_root: bool | None = None) -> list[str]:
    """The mandatory layers not in ``layers``, by name, in a stable order."""
    needed = set(MANDATORY_LAYERS)
    if os.geteuid() == 0 if as_root is None else as_root:
        needed.add(IsolationLayer.UNPRIVILEGED_UID)
    return sorted(layer.value for layer in needed - set(layers))


@dataclass(frozen=True)
class Isolation:
    """Which optional layers to apply. Rlimits, and the uid drop when running as root, always apply.

    Switching layers off exists so tests can show each layer holding on its own.
    """

    network_namespace: bool = True
    private_tmp: bool = True
    audit_hook: bool = True
    no_new_privs: bool = True
    seccomp: bool = True
    landlock: bool = True
    #: Refuse to run (kind ``error``) when a requested layer cannot be applied on this machine.
    strict: bool = False


def make_non_dumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: its ``/proc/<pid>`` files (environ, mem, maps, fd) then
    belong to root, and ptrace and process_vm_* refuse it, even for processes of its own uid.

    The sandbox server calls this first thing: as the pod's uid, code it runs shares that uid.
    """
    child.prctl(child.PR_SET_DUMPABLE, 0)


def is_non_dumpable() -> bool:
    return child.prctl(child.PR_GET_DUMPABLE) == 0
