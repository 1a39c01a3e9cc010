"""The learner component of a FlowRun: the training loop behind the Learner gRPC service.

One process holds the policy and drives the run. The loop reads top to bottom:

    resume from the newest complete checkpoint, if any
    evaluate the untrained planner (the baseline)
    for each step: wait for the step's trajectories -> Flow-GRPO update -> publish the new
                   version -> log metrics -> checkpoint / evaluate at their intervals
    evaluate the final planner, log it to MLflow, tell the workers the run is done

The gRPC servicer is a thin adapter: it leases units from the ``StepCoordinator`` (or from the
open evaluation round) to workers, files their trajectories back, and streams weights. All the
heavy work (the update, checkpoint I/O) runs in worker threads so the service keeps answering
while the learner computes. SIGTERM (Ctrl-C in ``flowlane run``, a pod deletion) writes a
checkpoint of the last completed step before the process exits, so ``--resume`` loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flowlane.api.flowrun import Phase
from flowlane.kit import logs
from flowlane.kit.lifetime import die_with_parent, under_torchrun
from flowlane.trainer.learner_records import (
    EvalRound,
    TrainingLearner,
    TrainingProgress,
    WeightSyncLog,
    learner_config,
    load_run_tasks,
    refuse_overlap,
    rollout_metrics,
)

if TYPE_CHECKING:  # for the annotations only: the store and MLflow load when build() needs them
    from flowlane.kit.checkpoints import CheckpointStore
    from flowlane.kit.tracking import Tracker

log = logging.getLogger("flowlane.learner")

#: Most evaluation units one worker takes at once. A worker runs what it leased as one concurrent
#: wave and asks again when the whole wave is done, so a wave's slowest trajectory sets its time:
#: few large waves (its engine batches up to 64 sequences) beat many training-batch-sized ones.
EVAL_LEASE_MAX = 64


class LearnerRuntime:
    """The training loop and the state the gRPC service exposes."""

    def __init__(self, flowrun: Any, run_dir: Path, *, resume: bool = True) -> None:
        from flowlane.trainer.coordinator import StepCoordinator

        self.flowrun = flowrun
        self.spec = spec = flowrun.spec
        self.run_dir = run_dir
        self.resume = resume
        self.progress = TrainingProgress()
        self.total_steps = spec.schedule.steps
        from flowlane.kit.tasks import carve_validation

        schedule = spec.schedule
        # The validation split (mid-run evaluation, the best checkpoint) is carved from the training
        # split, so it is disjoint from what is trained on by construction; the test split (evalSplit)
        # is scored only before and after training.
        train, validation = carve_validation(
            load_run_tasks(spec.tasks.dataset, spec.tasks.split, spec.tasks.reward.value),
            schedule.validation_fraction, spec.algorithm.seed)
        if spec.tasks.limit:
            train = train[: spec.tasks.limit]
        self.train_tasks = train
        self.val_tasks = validation[: schedule.eval_limit] if schedule.eval_limit else validation
        eval_set = schedule.eval_tasks or spec.tasks.dataset
        held_out = load_run_tasks(eval_set, schedule.eval_split, spec.tasks.reward.value)
        refuse_overlap(train + validation, held_out, eval_set, schedule.eval_split)
        self.eval_tasks = held_out[: schedule.eval_limit] if schedule.eval_limit else held_out
        self._validated: tuple[int, float] | None = None  # (step, validation accuracy) of the last validation
        # Question id -> correct, from the untrained planner's test round: the final round is paired with it.
        self.baseline_correct: dict[str, bool] = {}
        self.coordinator: StepCoordinator[Any] = StepCoordinator(
            train, questions_per_step=spec.algorithm.batch_questions, group_size=spec.algorithm.group_size,
            seed=spec.algorithm.seed, max_staleness=spec.max_staleness,
        )
        self.eval_round: EvalRound | None = None
        self.done = asyncio.Event()
        self.version_changed = asyncio.Condition()
        self.weights_cache: tuple[int, list[Any]] | None = None
        self.weights_adapter_config = ""  # LoRA on vLLM: the published versions are adapters (kit.weights)
        # Made by build(); None until then (lease() and GetStatus answer before it and check the learner).
        self.learner: TrainingLearner = None  # type: ignore[assignment]
        self.store: CheckpointStore = None  # type: ignore[assignment]
        self.weights_store: CheckpointStore | None = None  # engine.weightSync: store -- versions go there, not gRPC
        self.tracker: Tracker = None  # type: ignore[assignment]
        self.incarnations: dict[str, str] = {}  # worker name -> current incarnation id
        self.weight_sync = WeightSyncLog()
        self.step_started = time.monotonic()
        self._stop_requested = False
        self._dirty_since_checkpoint = False
        # Held by a step from its update until the step is recorded, and by a checkpoint: a checkpoint
        # asked for over gRPC (Kueue preempting the run) waits for the step in flight to be whole.
        self._model_lock = asyncio.Lock()
        self.finished = False

    # -- set-up ---------------------------------------------------------------------------------
    def build(self) -> None:
        from flowlane.kit.checkpoints import CheckpointStore
        from flowlane.kit.tracking import Tracker
        from flowlane.kit.weights import checkpoint_root, open_weights_store
        from flowlane.trainer.distributed import lead
        from flowlane.trainer.learner import Learner

        spec = self.spec
        self.learner = lead(Learner(learner_config(spec)))  # with several ranks, the others follow its calls
        uri = checkpoint_root(spec.storage.checkpoint_uri, self.run_dir)
        endpoint = spec.storage.s3_endpoint or os.environ.get("FLOWLANE_S3_ENDPOINT")
        self.store = CheckpointStore.from_uri(uri, endpoint=endpoint, keep_last=spec.storage.keep_last)
        if spec.engine.weight_sync.value == "store":
            self.weights_store = open_weights_store(uri, endpoint)
        self.tracker = Tracker(spec.tracking.experiment, run_dir=self.run_dir, tracking_uri=spec.tracking.mlflow_uri)

    def start_tracking(self) -> None:
        """Open the MLflow run, or continue the one the restored checkpoint was logging to."""
        self.progress.mlflow_run_id = self.tracker.start_run(
            self.flowrun.name, params=self.flowrun.run_config()["spec"],
            tags={"flowlane.run": self.flowrun.name, "flowlane.algorithm": "flow-grpo"},
            resume_run_id=self.progress.mlflow_run_id or None,
        ) or ""

    def restore(self) -> bool:
        """Load the newest complete checkpoint. Returns True when one was found."""
        ref = self.store.latest() if self.resume else None
        if ref is None:
            return False
        from flowlane.kit.checkpoints import model_identity

        with tempfile.TemporaryDirectory(prefix="flowlane-restore-", dir=self.run_dir) as tmp:
            path = self.store.download(ref, Path(tmp) / "ckpt",
                                       expected_meta={"model": model_identity(self.learner.model_dir)})
            from flowlane.trainer.distributed import load_on_every_pod

            load_on_every_pod(self.learner, path, self.store, ref.step)  # other learner pods fetch their shards
        state = ref.meta.get("coordinator")
        if state:
            self.coordinator.load_state_dict(state)
        self.coordinator.policy_version = self.learner.policy_version
        self.progress.step = self.coordinator.learned_step
        logs.set_context(step=self.progress.step, policy_version=self.learner.policy_version)
        self.progress.last_checkpoint = f"{self.store.location}/{ref.name}"
        self.progress.baseline_accuracy = ref.meta.get("baseline_accuracy")
        self.baseline_correct = {key: bool(ok) for key, ok in (ref.meta.get("baseline_correct") or {}).items()}
        self.progress.mlflow_run_id = ref.meta.get("mlflow_run_id") or ""
        self.progress.held_out_accuracy = ref.meta.get("held_out_accuracy")
        self.progress.validation_accuracy = ref.meta.get("validation_accuracy")
        best = self.store.best()
        if best is not None and best.metric is not None:
            self.progress.best_checkpoint = f"{self.store.location}/{best.name}"
            self.progress.best_validation_accuracy = best.metric
        # A finished run resumed with more steps goes on training; one with as many is done.
        self.finished = bool(ref.meta.get("finished")) and self.progress.step >= self.total_steps
        log.info("resumed from %s (step %d, policy version %d)", ref.name, self.progress.step,
                 self.learner.policy_version)
        return True

    # -- the loop -------------------------------------------------------------------------------
    async def train(self) -> None:
        if self.finished:
            # Restarted after the run had completed (the final checkpoint is written last).
            self.progress.phase = Phase.SUCCEEDED
            self.done.set()
            return
        self.progress.phase = Phase.RUNNING
        await self._publish_weights()
        if self.progress.baseline_accuracy is None and self.progress.step == 0:
            baseline = await self._evaluate("baseline", self.eval_tasks, "test")
            if baseline is not None:
                self.progress.baseline_accuracy = baseline.accuracy()
                self.baseline_correct = baseline.correct()
        interval = self.spec.schedule.checkpoint_interval
        eval_interval = self.spec.schedule.eval_interval
        while self.coordinator.learned_step < self.total_steps and not self._stop_requested:
            self.step_started = time.monotonic()
            rollout_s = await self._wait_for_step()
            if self._stop_requested:
                break
            index, trajectories = self.coordinator.take_step()
            async with self._model_lock:
                started = time.monotonic()
                metrics = await asyncio.to_thread(self.learner.step, trajectories)
                learn_s = time.monotonic() - started
                self.coordinator.policy_version = self.learner.policy_version
                sync_started = time.monotonic()
                await self._publish_weights()  # before the next step opens: workers must see the new version
                publish_s = time.monotonic() - sync_started
                self.coordinator.mark_updated()
                step = index + 1
                rewards = [t.reward or 0.0 for t in trajectories]
                self.progress.step = step
                logs.set_context(step=step, policy_version=self.learner.policy_version)
                self.progress.reward_mean = statistics.fmean(rewards)
                self.progress.step_time_s = time.monotonic() - self.step_started
                self._dirty_since_checkpoint = True
            metrics.update(rollout_metrics(trajectories))
            metrics.update({"time/rollout_s": rollout_s, "time/learn_s": learn_s,
                            "time/publish_s": publish_s, "time/step_s": self.progress.step_time_s})
            self.tracker.log_metrics(step, metrics)
            if step == 1 or step % max(interval, 1) == 0:
                self.tracker.log_trajectories(step, trajectories[: min(4, len(trajectories))])
            log.info("step %d/%d reward %.3f loss %.4f (%.1fs rollout, %.1fs learn)", step, self.total_steps,
                     self.progress.reward_mean, metrics.get("loss", math.nan), rollout_s, learn_s)
            if eval_interval and self.val_tasks and (step % eval_interval == 0 or step == self.total_steps):
                validation = await self._evaluate(f"step-{step}", self.val_tasks, "val")
                if validation is not None:
                    self.progress.validation_accuracy = accuracy = validation.accuracy()
                    self._validated = (step, accuracy)
            # The last step's checkpoint is written once, after the final evaluation, with its
            # results: writing it before as well doubled the run's last upload (minutes to S3 for
            # a full fine-tune's optimizer state). A learner lost during that evaluation redoes the
            # last step from the checkpoint before it.
            if step % interval == 0 and step != self.total_steps:
                await self.checkpoint()
        if self._stop_requested:
            await self.checkpoint_if_dirty()
            self.progress.phase = Phase.SUSPENDED
            return
        final = await self._evaluate("final", self.eval_tasks, "test")
        if final is not None:
            self.progress.held_out_accuracy = final.accuracy()
            self._log_gain(final.correct())
        await self.checkpoint(final=True)
        await asyncio.to_thread(self._log_final_model)
        self.progress.phase = Phase.SUCCEEDED
        from flowlane.kit.tracking import RunStatus

        self.tracker.end(RunStatus.FINISHED)
        self.done.set()

    async def _wait_for_step(self) -> float:
        started = time.monotonic()
        while not self.coordinator.step_ready() and not self._stop_requested:
            filled, needed = self.coordinator.progress()
            self.progress.message = f"step {self.coordinator.learned_step + 1}: {filled}/{needed} trajectories"
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    async def _evaluate(self, label: str, tasks: list[Any], split: str) -> EvalRound | None:
        """One evaluation round over ``tasks``; ``split`` ("val" or "test") prefixes its MLflow metrics.

        None when the run was stopped before the round completed.
        """
        if not tasks or self._stop_requested:
            return None
        label = f"{split}-{label}"
        self.eval_round = EvalRound(label, self.learner.policy_version, list(tasks))
        started = time.monotonic()
        while not self.eval_round.complete and not self._stop_requested:
            self.progress.message = (f"evaluating ({label}): "
                                     f"{len(self.eval_round.results)}/{len(self.eval_round.tasks)}")
            await asyncio.sleep(0.1)
        round_, self.eval_round = self.eval_round, None
        if not round_.complete:
            return None
        metrics = round_.metrics(split)
        metrics[f"{split}/time_s"] = time.monotonic() - started
        if label == "test-baseline":
            metrics.update({"test/baseline_accuracy": metrics["test/accuracy"],
                            "test/baseline_turns_per_trajectory": metrics["test/turns_per_trajectory"]})
        self.tracker.log_metrics(self.coordinator.learned_step, metrics)
        log.info("%s accuracy (%s, %d questions): %.3f (95%% CI %.3f-%.3f), %.2f planner turns per question",
                 split, label, len(round_.tasks), metrics[f"{split}/accuracy"], metrics[f"{split}/accuracy_ci_low"],
                 metrics[f"{split}/accuracy_ci_high"], metrics[f"{split}/turns_per_trajectory"])
        return round_

    def _log_gain(self, final: dict[str, bool]) -> None:
        """The trained planner's test gain over the untrained one's, paired question by question."""
        from flowlane.kit.evalstats import paired_gain

        try:
            gain = paired_gain(self.baseline_correct, final)
        except ValueError as err:  # e.g. resumed from a checkpoint written before baselines were kept
            log.warning("no paired test gain: %s", err)
            return
        self.tracker.log_metrics(self.coordinator.learned_step, gain.metrics("test/gain"))
        log.info("test gain %s", gain.describe())

    async def checkpoint_if_dirty(self) -> None:
        """A checkpoint of the last completed step, unless the newest checkpoint is of it (or no step ran)."""
        if self.learner is not None and self.store is not None:  # the check waits for a step in flight
            await self.checkpoint(only_if_dirty=True)

    async def checkpoint(self, *, final: bool = False, only_if_dirty: bool = False) -> None:
        async with self._model_lock:
            if not only_if_dirty or self._dirty_since_checkpoint:
                await self._write_checkpoint(final=final)

    async def _write_checkpoint(self, *, final: bool) -> None:
        from flowlane.kit.checkpoints import CheckpointError

        step = self.coordinator.learned_step
        from flowlane.kit.checkpoints import model_identity

        meta = {"coordinator": self.coordinator.state_dict(), "run": self.flowrun.name,
                "model": model_identity(self.learner.model_dir),
                "baseline_accuracy": self.progress.baseline_accuracy, "baseline_correct": self.baseline_correct,
                "held_out_accuracy": self.progress.held_out_accuracy, "finished": final,
                "validation_accuracy": self.progress.validation_accuracy,
                "mlflow_run_id": self.progress.mlflow_run_id}

        # The best checkpoint is chosen on the validation split, and only by a score of this very step.
        validated = self._validated[1] if self._validated is not None and self._validated[0] == step else None

        def save() -> Any:
            with tempfile.TemporaryDirectory(prefix="flowlane-ckpt-", dir=self.run_dir) as tmp:
                from flowlane.trainer.distributed import save_on_every_pod

                # Other learner pods upload their own shards; the manifest names them too.
                model_meta, parts = save_on_every_pod(self.learner, Path(tmp), self.store, step)
                return self.store.save(step, Path(tmp), {**model_meta, **meta},
                                       metric=validated, parts=parts)

        try:
            ref = await asyncio.to_thread(save)
        except CheckpointError as err:
            # Training goes on; the previous checkpoint stays the latest complete one.
            log.error("checkpoint at step %d failed: %s", step, err)
            self.progress.message = f"checkpoint failed: {err}"
            return
        self.progress.last_checkpoint = f"{self.store.location}/{ref.name}"
        best = self.progress.best_validation_accuracy
        if validated is not None and (best is None or validated >= best):  # ties: the newer, as retention
            self.progress.best_checkpoint = self.progress.last_checkpoint
            self.progress.best_validation_accuracy = validated
        self._dirty_since_checkpoint = False
        log.info("checkpoint %s written", self.progress.last_checkpoint)

    def _log_final_model(self) -> None:
        from flowlane.kit.checkpoints import DEEPSPEED_DIR, RNG_FILE

        with tempfile.TemporaryDirectory(prefix="flowlane-final-", dir=self.run_dir) as tmp:
            # The published planner is the checkpoint's model part (full weights, or the LoRA adapter).
            self.learner.save_checkpoint_files(Path(tmp))
            shutil.rmtree(Path(tmp) / DEEPSPEED_DIR)
            (Path(tmp) / RNG_FILE).unlink()
            self.tracker.log_model(Path(tmp), step=self.coordinator.learned_step)

    async def _publish_weights(self) -> None:
        version = self.learner.policy_version
        if self.weights_cache is not None and self.weights_cache[0] == version:
            return
        from flowlane.kit.weights import adapter_sync, publish_version

        started = time.monotonic()
        adapter_only = adapter_sync(self.spec.model.lora.enabled, self.spec.engine.kind.value)
        adapter_config, tensors = await asyncio.to_thread(self.learner.export_policy, adapter_only)
        if self.weights_store is not None:
            # Written once, before any worker hears of the version; the learner keeps no copy.
            await asyncio.to_thread(publish_version, self.weights_store, version, tensors, scratch=self.run_dir,
                                    adapter_config=adapter_config)
            tensors = []
        self.weights_cache, self.weights_adapter_config = (version, tensors), adapter_config
        self.weight_sync.published(version, time.monotonic() - started)
        async with self.version_changed:
            self.version_changed.notify_all()

    def request_stop(self) -> None:
        self._stop_requested = True

    # -- what the service hands out -------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """Whether the planner is built, restored from its checkpoint and published: before that the
        coordinator's state is not the run's, so no unit is leased or taken in."""
        return self.learner is not None and self.weights_cache is not None

    def lease(self, worker_id: str, max_tasks: int) -> tuple[list[dict[str, Any]], int]:
        """Units for a worker as plain dicts (unit_id, task, seed, eval) and the policy version."""
        if not self.loaded:
            return [], 0  # still loading the planner
        self._note_incarnation(worker_id)
        now = time.monotonic()
        limit = max_tasks or max(self.spec.algorithm.batch_questions * self.spec.algorithm.group_size, 1)
        round_ = self.eval_round
        if round_ is not None:
            per_worker = math.ceil(len(round_.tasks) / max(self.spec.rollout.replicas, 1))
            limit = max(limit, min(EVAL_LEASE_MAX, per_worker))
            out = []
            for task in round_.tasks:
                unit = round_.unit_id(task)
                held = round_.leases.get(unit)
                if unit in round_.results or (held and held[1] > now):
                    continue
                round_.leases[unit] = (worker_id, now + self.coordinator.lease_timeout_s)
                out.append({"unit_id": unit, "task": task, "seed": 0, "eval": True})
                if len(out) >= limit:
                    break
            return out, round_.policy_version
        if self.coordinator.learned_step >= self.total_steps or self._stop_requested:
            return [], self.learner.policy_version
        units = self.coordinator.lease(worker_id, limit, now)
        return ([{"unit_id": u.key, "task": t, "seed": u.seed, "eval": False} for u, t in units],
                self.learner.policy_version)

    def _note_incarnation(self, worker_id: str) -> None:
        name = worker_id.split("/", 1)[0]
        previous = self.incarnations.get(name)
        if previous != worker_id:
            if previous is not None:
                released = self.coordinator.register_worker(previous)
                if self.eval_round is not None:
                    for unit in [u for u, (w, _) in self.eval_round.leases.items() if w == previous]:
                        del self.eval_round.leases[unit]
                log.info("worker %s restarted; released %d leased units", name, released)
            self.weight_sync.forget(name)  # the new process has loaded nothing the learner has seen yet
            self.incarnations[name] = worker_id

    def note_sampled(self, worker_id: str, trajectory: Any) -> None:
        """Record the version ``worker_id`` sampled ``trajectory`` with (a current incarnation only)."""
        name = worker_id.split("/", 1)[0]
        versions = [turn.policy_version for turn in trajectory.planner_turns]
        if name and versions and self.incarnations.get(name, worker_id) == worker_id:
            self.weight_sync.sampled(name, max(versions))

    def submit(self, unit_id: str, trajectory: Any, policy_version: int) -> str:
        from flowlane.trainer.coordinator import SubmitOutcome

        if unit_id.startswith("eval:"):
            round_ = self.eval_round
            if round_ is None or not unit_id.startswith(f"eval:{round_.label}:"):
                return SubmitOutcome.DUPLICATE.value
            if unit_id in round_.results:
                return SubmitOutcome.DUPLICATE.value
            round_.results[unit_id] = trajectory
            round_.leases.pop(unit_id, None)
            return SubmitOutcome.ACCEPTED.value
        outcome = self.coordinator.submit(unit_id, trajectory, policy_version)
        if outcome is SubmitOutcome.ACCEPTED:
            self.progress.trajectories += 1
        return outcome.value


def follow_rank_zero(flowrun: Any) -> int:
    """A learner rank other than 0: hold its part of the policy and make rank 0's calls until the end.

    Signals are left to rank 0, which checkpoints and then ends the group; a follower that
    stopped on its own would leave rank 0's next collective waiting.
    """
    from flowlane.trainer.distributed import follow
    from flowlane.trainer.learner import Learner

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    learner = Learner(learner_config(flowrun.spec))
    logs.set_context(rank=learner.rank)
    calls = follow(learner)
    log.info("rank %d: rank 0 ended the run after %d calls", learner.rank, calls)
    return 0


# -- the gRPC adapter ---------------------------------------------------------------------------


def make_servicer(runtime: LearnerRuntime) -> Any:
    import grpc

    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import (
        DEFAULT_WEIGHT_CHUNK_BYTES,
        iter_weight_chunks,
        trajectory_from_record,
    )

    class LearnerServicer(learner_pb2_grpc.LearnerServicer):
        async def GetTasks(self, request: Any, context: Any) -> Any:
            if runtime.done.is_set():
                return learner_pb2.TaskBatch(done=True, policy_version=runtime.learner.policy_version)
            units, version = runtime.lease(request.worker_id, request.max_tasks)
            tasks = [learner_pb2.Task(question_id=u["task"].id, question=u["task"].question,
                                      answer=str(u["task"].answer), source=u["task"].source,
                                      reward_kind=u["task"].reward, unit_id=u["unit_id"], seed=u["seed"],
                                      eval=u["eval"]) for u in units]
            return learner_pb2.TaskBatch(tasks=tasks, policy_version=version,
                                         group_size=runtime.spec.algorithm.group_size,
                                         step=runtime.coordinator.learned_step)

        async def SubmitTrajectories(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
            if not runtime.loaded:
                # A worker that outlived a learner restart submits what it rolled out for the last
                # incarnation: it retries on UNAVAILABLE, and the loaded learner then judges the units.
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the learner is still loading the planner")
            ack = learner_pb2.SubmitAck(policy_version=runtime.learner.policy_version)
            async for chunk in request_iterator:
                for record in chunk.trajectories:
                    try:
                        trajectory = trajectory_from_record(record)
                    except (ValueError, KeyError) as err:
                        ack.rejected += 1
                        ack.reasons.append(f"{record.trajectory_id}: malformed ({err})")
                        continue
                    runtime.note_sampled(record.worker_id, trajectory)
                    version = min((t.policy_version for t in trajectory.planner_turns),
                                  default=runtime.learner.policy_version)
                    outcome = runtime.submit(record.trajectory_id, trajectory, version)
                    if outcome == "accepted":
                        ack.accepted += 1
                    elif outcome == "duplicate":
                        ack.duplicates += 1
                    else:
                        ack.rejected += 1
                        ack.reasons.append(f"{record.trajectory_id}: {outcome}")
            return ack

        async def GetWeights(self, request: Any, context: Any) -> AsyncIterator[Any]:
            while runtime.weights_cache is None or runtime.weights_cache[0] < request.min_version:
                async with runtime.version_changed:
                    await runtime.version_changed.wait()
            version, tensors = runtime.weights_cache
            chunk_bytes = min(request.chunk_bytes or DEFAULT_WEIGHT_CHUNK_BYTES, DEFAULT_WEIGHT_CHUNK_BYTES)
            started = time.monotonic()
            for chunk in iter_weight_chunks(tensors, version, chunk_bytes, runtime.weights_adapter_config):
                yield chunk  # writes wait on HTTP/2 flow control: this times the worker reading and loading it
            runtime.weight_sync.transferred(version, time.monotonic() - started)

        async def WatchVersion(self, request: Any, context: Any) -> AsyncIterator[Any]:
            last = request.after_version
            while True:
                version = runtime.weights_cache[0] if runtime.weights_cache else 0
                if version > last:
                    last = version
                    yield learner_pb2.VersionUpdate(policy_version=version, step=runtime.progress.step,
                                                    done=runtime.done.is_set())
                if runtime.done.is_set():
                    return
                async with runtime.version_changed:
                    await runtime.version_changed.wait()

        async def Checkpoint(self, request: Any, context: Any) -> Any:
            await runtime.checkpoint_if_dirty()
            return await self.GetStatus(learner_pb2.StatusRequest(), context)

        async def GetStatus(self, request: Any, context: Any) -> Any:
            p = runtime.progress
            version = runtime.learner.policy_version if runtime.learner else 0
            sync = runtime.weight_sync
            status = learner_pb2.LearnerStatus(
                step=p.step, policy_version=version, worker_policy_versions=sync.workers,
                reward_mean=0.0 if math.isnan(p.reward_mean) else p.reward_mean,
                last_checkpoint=p.last_checkpoint, mlflow_run_id=p.mlflow_run_id, phase=p.phase.value,
                total_steps=runtime.total_steps, trajectories=p.trajectories, step_time_s=p.step_time_s,
                message=p.message, best_checkpoint=p.best_checkpoint,
            )
            # The optional fields stay unset (HasField false) until the learner knows them.
            for name in ("held_out_accuracy", "baseline_accuracy", "validation_accuracy", "best_validation_accuracy"):
                if getattr(p, name) is not None:
                    setattr(status, name, getattr(p, name))
            if (staleness := sync.staleness(version)) is not None:
                status.staleness = staleness
            if (sync_s := sync.sync_s()) is not None:
                status.last_weight_sync_s = sync_s
            return status

    return LearnerServicer()


async def serve_learner(flowrun: Any, run_dir: Path, host: str, port: int, resume: bool,
                        token: str | None, linger_s: float = 3.0) -> int:
    from flowlane.api import learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server

    run_dir.mkdir(parents=True, exist_ok=True)
    runtime = LearnerRuntime(flowrun, run_dir, resume=resume)
    server = create_server(token)
    learner_pb2_grpc.add_LearnerServicer_to_server(make_servicer(runtime), server)
    bound = bind_port(server, host, port)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)
    runtime.progress.message = "loading the planner"
    await asyncio.to_thread(runtime.build)
    await asyncio.to_thread(runtime.restore)
    await asyncio.to_thread(runtime.start_tracking)
    print(f"flowlane learner listening on {host}:{bound}", flush=True)
    try:
        await runtime.train()
        runtime.done.set()
        await asyncio.sleep(linger_s)  # let workers hear "done" before the server goes away
    finally:
        await server.stop(grace=1.0)
    from flowlane.trainer.distributed import release_followers

    release_followers(runtime.learner)
    return 0 if runtime.progress.phase in (Phase.SUCCEEDED, Phase.SUSPENDED) else 1


def size_torch_threads() -> None:
    """One torch thread per CPU this rank may keep busy (``flowlane.kit.cpus.learner_threads``).
    torch's default is one per visible core: in a pod with a CPU limit on a large node, or with
    the pods of a local run side by side, that is more busy threads than CPUs (two ranks of two
    threads each on two cores took 85 s for their first step, against 43 s with one each)."""
    import torch

    from flowlane.kit.cpus import cpu_budget, learner_threads

    threads = learner_threads(os.environ, cpu_budget())
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("torch threads: %d", torch.get_num_threads())


def learner(
    config: Path = typer.Option(..., "--config", help="The rendered FlowRun (run config YAML)."),
    port: int = typer.Option(50051, "--port", help="gRPC port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    run_dir: Path | None = typer.Option(None, "--run-dir", envvar="FLOWLANE_RUN_DIR",
                                        help="Local state: default checkpoint and MLflow stores, temp files."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    log_format: str | None = typer.Option(None, "--log-format", help=logs.LOG_FORMAT_HELP),
) -> None:
    """Run the learner service of a FlowRun."""
    from flowlane.api.flowrun import load_flowrun
    from flowlane.kit.grpc_common import resolve_token

    if under_torchrun():  # a rank in a session of its own: it must end with its launcher
        die_with_parent(os.getppid())
    logs.configure("learner", log_format=log_format)
    size_torch_threads()
    flowrun = load_flowrun(config)
    logs.set_context(run=flowrun.name)
    if int(os.environ.get("RANK", "0")) > 0:  # one of several ranks under torchrun: rank 0 serves
        raise typer.Exit(follow_rank_zero(flowrun))
    directory = run_dir or Path("runs") / flowrun.name
    code = asyncio.run(serve_learner(flowrun, directory, host, port, resume, resolve_token()))
    raise typer.Exit(code)


