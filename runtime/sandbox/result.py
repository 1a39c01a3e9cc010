"""What a sandboxed run returns, and how the way it ended becomes an error kind and a one-line message."""

from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from flowlane.runtime.sandbox.child import EXIT_BLOCKED, EXIT_FILE, EXIT_MEMORY, EXIT_PROCESS, EXIT_SETUP
from flowlane.runtime.sandbox.layers import IsolationLayer
from flowlane.runtime.sandbox.limits import MiB, SandboxLimits


class SandboxErrorKind(StrEnum):
    """Why a run did not end normally."""

    TIMEOUT = "timeout"  # wall-clock limit: the caller killed the process group
    CPU_LIMIT = "cpu_limit"  # RLIMIT_CPU: SIGXCPU
    MEMORY_LIMIT = "memory_limit"  # RLIMIT_AS: an uncaught MemoryError
    PROCESS_LIMIT = "process_limit"  # RLIMIT_NPROC: fork or thread creation failed, uncaught
    FILE_LIMIT = "file_limit"  # RLIMIT_FSIZE: a write failed with EFBIG, uncaught
    KILLED = "killed"  # ended by another signal (SIGKILL, SIGSEGV, ...)
    BLOCKED = "blocked"  # the audit hook refused an operation and the code did not handle it
    ERROR = "error"  # any other non-zero exit (an exception in the code, a bad setup)



@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: never started
    ok: bool
    error_kind: SandboxErrorKind | None = None
    message: str = ""  # one line for humans and LLMs ("timeout: wall-clock limit of 2s")
    truncated: bool = False  # stdout or stderr went over max_output_bytes
    duration_s: float = 0.0
    isolation: tuple[IsolationLayer, ...] = ()  # layers that were in force for this run
    sandbox_uid: int | None = None  # the per-run uid when the caller was root
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kind"] = self.error_kind.value if self.error_kind else None
        data["isolation"] = [layer.value for layer in self.isolation]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxResult:
        data = dict(data)
        data["error_kind"] = SandboxErrorKind(data["error_kind"]) if data.get("error_kind") else None
        data["isolation"] = tuple(IsolationLayer(v) for v in data.get("isolation", ()))
        return cls(**data)


# How the bootstrap classifies an uncaught exception (user code can fake these exit codes, which
# only misreports its own failure).
_EXIT_KINDS = {
    EXIT_MEMORY: SandboxErrorKind.MEMORY_LIMIT,
    EXIT_BLOCKED: SandboxErrorKind.BLOCKED,
    EXIT_PROCESS: SandboxErrorKind.PROCESS_LIMIT,
    EXIT_FILE: SandboxErrorKind.FILE_LIMIT,
}


def classify_exit(
    returncode: int | None, timed_out: bool, limits: SandboxLimits, stderr: str
) -> tuple[SandboxErrorKind | None, str]:
    if timed_out:
        return SandboxErrorKind.TIMEOUT, f"timeout: wall-clock limit of {limits.wall_time_s:g}s"
    if returncode == 0:
        return None, ""
    if returncode is None:
        return SandboxErrorKind.ERROR, "error: the process did not start"
    if returncode == -signal.SIGXCPU:
        return SandboxErrorKind.CPU_LIMIT, f"cpu_limit: CPU-time limit of {math.ceil(limits.cpu_time_s)}s"
    if returncode == -signal.SIGXFSZ:
        return SandboxErrorKind.FILE_LIMIT, f"file_limit: file-size limit of {limits.max_file_bytes} bytes"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return SandboxErrorKind.KILLED, f"killed: by signal {name}"
    kind = _EXIT_KINDS.get(returncode)
    if kind is SandboxErrorKind.MEMORY_LIMIT:
        return kind, f"memory_limit: memory limit of {limits.memory_bytes // MiB} MiB"
    if kind is SandboxErrorKind.PROCESS_LIMIT:
        return kind, f"process_limit: process/thread limit of {limits.max_processes}"
    if kind is SandboxErrorKind.FILE_LIMIT:
        return kind, f"file_limit: file-size limit of {limits.max_file_bytes} bytes"
    last_line = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
    if kind is SandboxErrorKind.BLOCKED:
        return kind, f"blocked: {last_line}" if last_line else "blocked"
    if returncode == EXIT_SETUP:
        return SandboxErrorKind.ERROR, f"error: sandbox setup failed: {last_line}"
    return SandboxErrorKind.ERROR, f"error: exit code {returncode}" + (f": {last_line}" if last_line else "")
