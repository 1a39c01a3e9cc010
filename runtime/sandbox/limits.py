"""The resource limits of one sandboxed run."""

from __future__ import annotations

from dataclasses import dataclass

from flowlane.api.errors import ConfigError

MiB = 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. Defaults suit LLM-written snippets (math, parsing, small sims)."""

    cpu_time_s: float = 5.0  # CPU seconds (RLIMIT_CPU, rounded up to whole seconds)
    wall_time_s: float = 10.0  # wall-clock seconds, including interpreter start-up
    memory_bytes: int = 1024 * MiB  # address space (RLIMIT_AS); numpy + sympy need about 200 MiB
    max_processes: int = 32  # processes and threads of the run's uid (RLIMIT_NPROC)
    max_file_bytes: int = 16 * MiB  # largest file the code may write (RLIMIT_FSIZE)
    max_output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr); the rest is dropped
    max_open_files: int = 256  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        for name in ("cpu_time_s", "wall_time_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox limits: {name} must be > 0, got {getattr(self, name)}")
        for name in ("memory_bytes", "max_processes", "max_file_bytes", "max_output_bytes", "max_open_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sandbox limits: {name} must be >= 1, got {getattr(self, name)}")
