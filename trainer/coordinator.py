"""Which trajectories a training step needs, who is producing them, and which have arrived.

The learner is the hub of a FlowRun: rollout workers ask it for work and send trajectories back.
Workers die (a pod is evicted, `kill -9`), retry (a lost ack), and lag behind the policy. This
module is the bookkeeping that keeps a step correct through all of that, as pure state with no
I/O, so it can be tested exhaustively and checkpointed as plain data:

- a step is a fixed set of *units*: (question, sample index) for ``questions_per_step`` questions
  times ``group_size`` samples (Flow-GRPO's G); the question order comes from a seeded cursor over
  the task list, so a resumed run continues with the same next questions;
- units are *leased* to a worker; a lease expires after ``lease_timeout_s`` or when the worker
  re-registers (it restarted), and the unit is handed out again;
- a unit is filled by the first trajectory that arrives for it; later ones (a retry, an expired
  lease whose worker was only slow) are duplicates and are not counted twice;
- with ``max_staleness > 0`` the next step's units are leased while the current step is being
  learned from; a trajectory older than ``max_staleness`` versions is rejected and its unit
  handed out again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar


class HasId(Protocol):
    @property
    def id(self) -> str: ...


TaskT = TypeVar("TaskT", bound=HasId)


class SubmitOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Unit:
    """One trajectory a step needs: sample ``sample`` of question ``question_id`` at ``step``."""

    step: int
    question_id: str
    sample: int

    @property
    def key(self) -> str:
        return f"{self.step}:{self.question_id}:{self.sample}"

    @property
    def seed(self) -> int:
        # Distinct per unit and reproducible across restarts.
        return _stable_seed(self.key)


def _stable_seed(key: str) -> int:
    """FNV-1a: Python's ``hash`` of a str changes between processes, this does not."""
    value = 2166136261
    for byte in key.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value & 0x7FFFFFFF


@dataclass
class _Lease:
    worker_id: str
    expires_at: float


@dataclass
class _Step(Generic[TaskT]):
    index: int
    tasks: list[TaskT]
    units: list[Unit]
    leases: dict[str, _Lease] = field(default_factory=dict)
    filled: dict[str, Any] = field(default_factory=dict)  # unit key -> trajectory payload

    @property
    def complete(self) -> bool:
        return len(self.filled) == len(self.units)


class StepCoordinator(Generic[TaskT]):
    def __init__(
        self,
        tasks: Sequence[TaskT],
        *,
        questions_per_step: int,
        group_size: int,
        seed: int = 0,
        max_staleness: int = 0,
        lease_timeout_s: float = 600.0,
        cursor: int = 0,
        epoch: int = 0,
        first_step: int = 0,
    ) -> None:
        if not tasks:
            raise ValueError("StepCoordinator needs at least one task")
        if questions_per_step < 1 or group_size < 1:
            raise ValueError("questions_per_step and group_size must be >= 1")
        self._tasks = list(tasks)
        self._by_id = {t.id: t for t in self._tasks}
        self.questions_per_step = questions_per_step
        self.group_size = group_size
        self.seed = seed
        self.max_staleness = max_staleness
        self.lease_timeout_s = lease_timeout_s
        self.cursor = cursor
        self.epoch = epoch
        self._order = self._shuffled(epoch)
        self._steps: dict[int, _Step[TaskT]] = {}
        self.learned_step = first_step  # the step the learner trains on next
        self.updates_done = first_step  # steps whose update has finished
        self.policy_version = 0

    # -- the task cursor ------------------------------------------------------------------------
    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self._tasks)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_tasks(self, count: int) -> list[TaskT]:
        chosen: list[TaskT] = []
        while len(chosen) < count:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._shuffled(self.epoch)
            chosen.append(self._tasks[self._order[self.cursor]])
            self.cursor += 1
        return chosen

    def _step(self, index: int) -> _Step[TaskT]:
        if index not in self._steps:
            tasks = self._next_tasks(self.questions_per_step)
            units = [Unit(index, t.id, s) for t in tasks for s in range(self.group_size)]
            self._steps[index] = _Step(index, tasks, units)
        return self._steps[index]

    # -- handing out work -----------------------------------------------------------------------
    def open_steps(self) -> list[int]:
        """Steps whose units may be handed out now.

        Step ``s`` is sampled with the policy after ``updates_done`` updates, so it opens once
        ``s - updates_done <= max_staleness``: synchronously (0) only after the previous step's
        update has finished; with look-ahead up to ``max_staleness`` steps early.
        """
        return list(range(self.learned_step, self.updates_done + 1 + self.max_staleness))

    def mark_updated(self) -> None:
        """The update for the step last taken has finished (whether or not it changed the policy)."""
        self.updates_done = self.learned_step

    def register_worker(self, worker_id: str) -> int:
        """A (re)started worker: release every lease it held. Returns how many were released."""
        released = 0
        for step in self._steps.values():
            for key in [k for k, lease in step.leases.items() if lease.worker_id == worker_id]:
                del step.leases[key]
                released += 1
        return released

    def lease(self, worker_id: str, max_units: int, now: float) -> list[tuple[Unit, TaskT]]:
        """Up to ``max_units`` units nobody holds, oldest step first."""
        out: list[tuple[Unit, TaskT]] = []
        for index in self.open_steps():
            step = self._step(index)
            for unit in step.units:
                if len(out) >= max_units:
                    return out
                key = unit.key
                lease = step.leases.get(key)
                if key in step.filled or (lease is not None and lease.expires_at > now):
                    continue
                step.leases[key] = _Lease(worker_id, now + self.lease_timeout_s)
                out.append((unit, self._by_id[unit.question_id]))
        return out

    # -- taking trajectories back ---------------------------------------------------------------
    def submit(self, unit_key: str, payload: Any, policy_version: int) -> SubmitOutcome:
        try:
            step_index = int(unit_key.split(":", 1)[0])
        except ValueError:
            return SubmitOutcome.UNKNOWN
        step = self._steps.get(step_index)
        if step is None or all(u.key != unit_key for u in step.units):
            return SubmitOutcome.UNKNOWN if step_index >= self.learned_step else SubmitOutcome.DUPLICATE
        if unit_key in step.filled:
            return SubmitOutcome.DUPLICATE
        if self.policy_version - policy_version > self.max_staleness:
            step.leases.pop(unit_key, None)  # hand it out again, to be sampled with fresher weights
            return SubmitOutcome.STALE
        step.filled[unit_key] = payload
        step.leases.pop(unit_key, None)
        return SubmitOutcome.ACCEPTED

    def step_ready(self) -> bool:
        return self._step(self.learned_step).complete

    def progress(self) -> tuple[int, int]:
        """(filled, needed) units of the step being collected."""
        step = self._step(self.learned_step)
        return len(step.filled), len(step.units)

    def take_step(self) -> tuple[int, list[Any]]:
        """The completed current step's payloads, in unit order; advances to the next step."""
        step = self._step(self.learned_step)
        if not step.complete:
            raise RuntimeError(f"step {step.index} is not complete ({len(step.filled)}/{len(step.units)})")
        payloads = [step.filled[u.key] for u in step.units]
        del self._steps[step.index]
        self.learned_step += 1
        return step.index, payloads

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The resumable state. Steps in flight are not saved: their questions are re-drawn.

        To resume exactly, the cursor is rewound to where the oldest unlearned step began.
        """
        cursor, epoch = self.cursor, self.epoch
        pending = sorted(self._steps)
        if pending:
            drawn = sum(len(self._steps[i].tasks) for i in pending)
            cursor -= drawn
            while cursor < 0:  # the pending steps crossed an epoch boundary
                epoch -= 1
                cursor += len(self._tasks)
        return {"cursor": cursor, "epoch": epoch, "learned_step": self.learned_step,
                "policy_version": self.policy_version, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])
        self.learned_step = int(state["learned_step"])
        self.updates_done = self.learned_step
        self.policy_version = int(state["policy_version"])
        self.seed = int(state.get("seed", self.seed))
        self._order = self._shuffled(self.epoch)
        self._steps.clear()


def question_batches(tasks: Sequence[TaskT], questions_per_step: int, steps: int, seed: int = 0) -> list[list[TaskT]]:
    """The questions of each of the first ``steps`` steps, in the order a run with ``seed`` trains on them.

    For a peer trainer that must see the same questions in the same order (``bench/vs_trl.py``).
    """
    coordinator = StepCoordinator(tasks, questions_per_step=questions_per_step, group_size=1, seed=seed)
    return [coordinator._next_tasks(questions_per_step) for _ in range(steps)]
