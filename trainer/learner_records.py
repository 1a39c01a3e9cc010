"""The learner's records and data, plain and model-free: what ``learner_service.py``'s loop keeps.

``TrainingProgress`` (what GetStatus serves), ``EvalRound`` (one pass over an evaluation split),
``WeightSyncLog`` (which policy version each rollout worker holds, and how long a sync took), the
task splits a run loads (``load_run_tasks``, ``refuse_overlap``), the per-step rollout metrics, the
learner's config from a FlowRun spec (``learner_config``) and what the loop uses of its learner
(``TrainingLearner``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flowlane.api.enums import Dtype, RewardKind
from flowlane.api.errors import ConfigError
from flowlane.api.flowrun import JUDGE_REFUSED, Phase

if TYPE_CHECKING:  # for the annotations only: torch loads when the learner is built
    import torch

    from flowlane.api.trajectory import Trajectory
    from flowlane.trainer.learner_config import LearnerConfig


class TrainingLearner(Protocol):
    """What the loop uses of its learner: a ``Learner``, or with several ranks the ``LeadLearner`` around it."""

    policy_version: int
    model_dir: Path

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]: ...

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def export_policy(self, adapter_only: bool) -> tuple[str, list[tuple[str, torch.Tensor]]]: ...

    def save_checkpoint_files(self, directory: Path) -> dict[str, Any]: ...

    def load_checkpoint_files(self, directory: Path) -> dict[str, Any]: ...


@dataclass
class EvalRound:
    """One pass over the held-out questions, each answered once, with a fixed policy version."""

    label: str  # "baseline", "step-10", "final"
    policy_version: int
    tasks: list[Any]
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # unit id -> (worker, expiry)
    results: dict[str, Any] = field(default_factory=dict)  # unit id -> trajectory

    def unit_id(self, task: Any) -> str:
        return f"eval:{self.label}:{task.id}"

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.tasks)

    def correct(self) -> dict[str, bool]:
        """Question id -> answered correctly (reward above 0.5), for the questions answered so far."""
        by_unit = {self.unit_id(task): task.id for task in self.tasks}
        return {by_unit[unit]: (t.reward or 0.0) > 0.5 for unit, t in self.results.items() if unit in by_unit}

    def accuracy(self) -> float:
        correct = self.correct()
        return sum(correct.values()) / max(len(correct), 1)

    def metrics(self, split: str) -> dict[str, float]:
        """``{split}/accuracy`` with its 95% Wilson interval, and how the agent got there (turns, tokens)."""
        from flowlane.kit.evalstats import wilson_interval

        correct = self.correct()
        right = sum(correct.values())
        low, high = wilson_interval(right, len(correct))
        trajectories = list(self.results.values())
        count = max(len(trajectories), 1)
        return {f"{split}/accuracy": right / max(len(correct), 1), f"{split}/accuracy_ci_low": low,
                f"{split}/accuracy_ci_high": high, f"{split}/questions": float(len(correct)),
                f"{split}/turns_per_trajectory": sum(len(t.steps) for t in trajectories) / count,
                f"{split}/generated_tokens": float(sum(t.generated_tokens for t in trajectories))}


@dataclass
class TrainingProgress:
    step: int = 0
    reward_mean: float = math.nan
    held_out_accuracy: float | None = None  # the test split (evalSplit) after training
    baseline_accuracy: float | None = None  # the test split before training
    validation_accuracy: float | None = None  # the latest score of the validation split
    best_checkpoint: str = ""  # the checkpoint with the best validation score (retention keeps it)
    best_validation_accuracy: float | None = None
    last_checkpoint: str = ""
    mlflow_run_id: str = ""
    phase: Phase = Phase.PENDING
    trajectories: int = 0
    step_time_s: float = 0.0
    message: str = ""


class WeightSyncLog:
    """Which policy version each rollout worker has loaded, and how long the newest version took to sync.

    A worker's version is the one its latest trajectory was sampled with (a worker loads new weights
    only between waves, so every turn of a trajectory carries the version the worker holds). The sync
    time of a version is the learner's publication of it plus the slowest GetWeights transfer of it.
    """

    def __init__(self) -> None:
        self.workers: dict[str, int] = {}  # worker name -> policy version of its latest trajectory
        self.version = -1  # the newest published version
        self.publish_s = 0.0
        self.transfer_s = 0.0  # the slowest completed transfer of ``version``

    def published(self, version: int, seconds: float) -> None:
        self.version, self.publish_s, self.transfer_s = version, seconds, 0.0

    def transferred(self, version: int, seconds: float) -> None:
        if version == self.version:
            self.transfer_s = max(self.transfer_s, seconds)

    def sampled(self, worker: str, version: int) -> None:
        self.workers[worker] = max(version, self.workers.get(worker, version))

    def forget(self, worker: str) -> None:
        self.workers.pop(worker, None)

    def staleness(self, learner_version: int) -> int | None:
        """The learner's version minus the oldest worker's (0 if none is behind); None while no worker reported."""
        return max(learner_version - min(self.workers.values()), 0) if self.workers else None

    def sync_s(self) -> float | None:
        return self.publish_s + self.transfer_s if self.version >= 0 else None


def load_run_tasks(dataset: str, split: str, reward: str) -> list[Any]:
    """Bundled sets score each task with its own reward; user data with the spec's ``tasks.reward``."""
    import dataclasses

    from flowlane.kit.tasks import bundled_task_sets, load_tasks

    tasks = load_tasks(dataset, split)
    if dataset not in bundled_task_sets():
        return [dataclasses.replace(task, reward=reward) for task in tasks]
    judged = [task.id for task in tasks if task.reward == RewardKind.JUDGE.value]
    if judged:  # refused here, before any worker leases one and fails to score it
        raise ConfigError(f"dataset {dataset!r} split {split!r}: {len(judged)} tasks (e.g. {judged[0]}) are scored "
                          f"with reward judge, which {JUDGE_REFUSED}")
    return tasks


def refuse_overlap(training: list[Any], test: list[Any], dataset: str, split: str) -> None:
    """A ConfigError when a test question is also a training (or validation) question."""
    def key(task: Any) -> str:
        return " ".join(str(task.question).lower().split())

    seen = {key(t) for t in training}
    shared = [t for t in test if key(t) in seen]
    if shared:
        raise ConfigError(f"spec.schedule.evalSplit: {len(shared)} of the {len(test)} questions of {dataset!r} "
                          f"split {split!r} are also training questions (e.g. {shared[0].question!r}): test "
                          "accuracy would be measured on them; use a held-out split or dataset")


def rollout_metrics(trajectories: list[Any]) -> dict[str, float]:
    """Per-step agent statistics: turns, tool calls and errors per tool, parse failures, tokens."""
    count = max(len(trajectories), 1)
    out: dict[str, float] = {
        "rollout/trajectories": float(len(trajectories)),
        "rollout/turns_per_trajectory": sum(len(t.steps) for t in trajectories) / count,
        "rollout/generated_tokens": float(sum(t.generated_tokens for t in trajectories)),
        "rollout/accuracy": sum(1.0 for t in trajectories if (t.reward or 0) > 0.5) / count,
    }
    for key in ("tool_calls", "tool_errors", "parse_failures"):
        totals: dict[str, int] = {}
        for t in trajectories:
            for name, value in getattr(t, key).items():
                totals[name] = totals.get(name, 0) + value
        for name, value in totals.items():
            out[f"rollout/{key}/{name}"] = float(value)
    versions = [turn.policy_version for t in trajectories for turn in t.planner_turns]
    if versions:
        out["rollout/max_staleness"] = float(max(versions) - min(versions))
    return out


def learner_config(spec: Any) -> LearnerConfig:
    """The learner's plain-data config from a FlowRun spec (the one place the two meet)."""
    from flowlane.trainer.learner_config import LearnerConfig, LoraSettings

    algo = spec.algorithm
    lora = spec.model.lora
    dtype = spec.model.dtype
    return LearnerConfig(
        model_path=spec.model.planner,
        lr=algo.lr,
        total_steps=spec.schedule.steps,
        clip_eps_low=algo.clip_low,
        clip_eps_high=algo.clip_high,
        kl_beta=algo.kl_beta,
        kl_estimator=algo.kl_estimator,
        advantage_mode=algo.advantage_mode,
        aggregation=algo.loss_aggregation,
        zero_stage=spec.engine.zero_stage,
        # float16 training would need loss scaling: the learner keeps float32 where engines run float16
        dtype=Dtype.FLOAT32 if dtype is Dtype.FLOAT16 else dtype,
        lora=LoraSettings(r=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                          target_modules=tuple(lora.target_modules)) if lora.enabled else None,
        temperature=max(algo.temperature, 1e-3),
        tis_cap=algo.tis_cap,
        skip_uniform_groups=algo.skip_uniform_groups,
        mini_batches_per_step=algo.mini_batches,
        ppo_epochs=algo.ppo_epochs,
        seed=algo.seed,
    )
