"""What the local supervisor reports, and how it restarts a component.

The states a component goes through, the events ``on_event`` sees, the run's outcome, and the
back-off policy (``RestartPolicy``): the vocabulary ``flowlane run`` displays and tests assert on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True)
class RestartPolicy:
    restart_limit: int = 6  # restarts allowed per component before the run fails
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    reset_after_s: float = 60.0  # a run this long without crashing resets the back-off
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL
    ready_timeout_s: float = 300.0  # from process start until its ready port answers (model loading)

    def backoff_s(self, consecutive_crashes: int) -> float:
        """Delay before restart number ``consecutive_crashes`` (1-based): 1, 2, 4, ... capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, consecutive_crashes - 1))


class ComponentState(StrEnum):
    PENDING = "pending"  # waiting for dependencies
    STARTING = "starting"  # started, not ready yet
    READY = "ready"
    BACKOFF = "backoff"  # crashed, waiting to restart
    COMPLETED = "completed"  # a job that exited 0
    FAILED = "failed"  # restart limit reached
    STOPPED = "stopped"


class EventKind(StrEnum):
    STARTED = "started"
    READY = "ready"
    EXITED = "exited"
    RESTARTING = "restarting"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SupervisorEvent:
    kind: EventKind
    component: str
    message: str = ""
    pid: int | None = None
    exit_code: int | None = None  # negative: killed by that signal
    restarts: int = 0
    delay_s: float = 0.0  # RESTARTING: back-off before the next start
    time: float = field(default_factory=time.time)


class RunOutcome(StrEnum):
    COMPLETED = "completed"  # every job (non-service component) exited 0
    FAILED = "failed"  # a component hit its restart limit or never became ready
    STOPPED = "stopped"  # stop() (or a signal) ended the run


@dataclass
class ComponentStatus:
    name: str
    state: ComponentState = ComponentState.PENDING
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
