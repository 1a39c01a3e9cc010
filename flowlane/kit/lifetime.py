"""A process's lifetime tied to its parent's: ``PR_SET_PDEATHSIG`` on Linux, nothing elsewhere.

torchrun starts each rank in a session of its own, so a signal to the launcher's process group
never reaches the ranks: a launcher killed with SIGKILL (by the local supervisor, which takes a
whole learner group down when one pod fails, or by anything else) would leave its ranks running,
holding the learner's gRPC port and the rendezvous, and the restarted pod could not bind them.
A rank calls :func:`die_with_parent` at start, so it ends when its launcher does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or path is None:
        return None
    prctl: Callable[..., int] = ctypes.CDLL(path, use_errno=True).prctl
    return prctl


PRCTL = _libc_prctl()  # resolved at import, before any fork: no dynamic loading in a forked child


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when the parent ``parent_pid`` exits.

    Returns False where the call is not available (not Linux). A parent that already exited
    (this process was reparented before the call) ends this process at once, with or without the
    call: the signal would otherwise never come.
    """
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    return PRCTL is not None


def under_torchrun() -> bool:
    """True in a rank that torchrun (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ
