"""How many CPUs a process may use: its affinity mask, capped by its cgroup's CPU quota.

A pod with a CPU limit on a large node sees every core of the node (affinity) but may use only
its quota's worth of them; torch and vLLM start one thread per visible core unless told
otherwise, and more busy threads than CPUs make every thread wait. The learner sizes torch's
threads here (``learner_threads``); the vLLM engine decides here whether to pin its threads
(``own_cpus``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota|max> <period>"
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1: cpu.cfs_quota_us (-1: none), cpu.cfs_period_us
#: Learner ranks that share this machine's CPUs, when more than one pod's: ``flowlane run`` sets it
#: (every learner pod of a local run is on one machine). Unset, a pod's ranks share its own CPUs.
ENV_COLOCATED_RANKS = "FLOWLANE_COLOCATED_RANKS"


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX, v1: Path = CGROUP_V1_CPU) -> int | None:
    """Whole CPUs this process's cgroup may use (quota / period rounded up); None: no limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def own_cpus(allowed: set[int], quota: int | None) -> bool:
    """Whether the process has its CPUs to itself: no cgroup CPU quota below their count. A pod
    in a node's shared pool sees every CPU of the node and gets a share of them by quota; pinning
    its threads to particular CPUs there would pile pods onto the same ones."""
    return quota is None or quota >= len(allowed)


def cpu_budget(allowed: set[int] | None = None, quota: int | None = None) -> int:
    """The CPUs this process may keep busy: those it may run on, at most its quota (defaults:
    this process's affinity and cgroup)."""
    count = len(os.sched_getaffinity(0) if allowed is None else allowed)
    limit = cgroup_cpu_limit() if allowed is None and quota is None else quota
    return max(1, min(count, limit) if limit is not None else count)


def learner_threads(environ: Mapping[str, str], budget: int) -> int | None:
    """torch's intra-op threads for one learner rank, ``budget`` CPUs shared by the ranks on them:
    ``FLOWLANE_COLOCATED_RANKS`` (a local run's pods), else the pod's own (torchrun's
    ``LOCAL_WORLD_SIZE``), else one. None where ``OMP_NUM_THREADS`` is set, by the user or by
    torchrun (which sets 1 for several ranks per pod): torch follows it."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    ranks = int(environ.get(ENV_COLOCATED_RANKS) or environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, budget // max(ranks, 1))
