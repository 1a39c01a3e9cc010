"""The step coordinator: leases, duplicates, staleness and the resumable cursor."""

from dataclasses import dataclass

import pytest

from flowlane.trainer.coordinator import StepCoordinator, SubmitOutcome


@dataclass(frozen=True)
class T:
    id: str


TASKS = [T(f"q{i}") for i in range(5)]


def make(**kw):
    args = {"questions_per_step": 2, "group_size": 3, "seed": 7, "lease_timeout_s": 10.0} | kw
    return StepCoordinator(TASKS, **args)


def test_a_step_is_questions_times_group_size_units():
    coord = make()
    units = coord.lease("w0", 100, now=0.0)
    assert len(units) == 6
    assert len({u.question_id for u, _ in units}) == 2
    assert sorted(u.sample for u, _ in units) == [0, 0, 1, 1, 2, 2]


def test_leased_units_are_not_handed_out_twice_until_the_lease_expires():
    coord = make()
    first = coord.lease("w0", 4, now=0.0)
    second = coord.lease("w1", 100, now=1.0)
    assert {u.key for u, _ in first}.isdisjoint({u.key for u, _ in second})
    assert len(second) == 2
    assert coord.lease("w2", 100, now=5.0) == []
    expired = coord.lease("w2", 100, now=11.0)
    assert {u.key for u, _ in expired} == {u.key for u, _ in first + second}


def test_a_restarted_worker_releases_its_leases():
    coord = make()
    held = coord.lease("w0", 3, now=0.0)
    assert coord.register_worker("w0") == 3
    again = coord.lease("w1", 3, now=0.1)
    assert [u.key for u, _ in again] == [u.key for u, _ in held]


def test_a_trajectory_is_counted_once():
    coord = make()
    (unit, _), *_ = coord.lease("w0", 1, now=0.0)
    assert coord.submit(unit.key, "a", policy_version=0) is SubmitOutcome.ACCEPTED
    assert coord.submit(unit.key, "b", policy_version=0) is SubmitOutcome.DUPLICATE
    assert coord.progress() == (1, 6)


def test_the_step_completes_with_payloads_in_unit_order():
    coord = make()
    units = coord.lease("w0", 100, now=0.0)
    for unit, _ in reversed(units):
        coord.submit(unit.key, unit.key, policy_version=0)
    assert coord.step_ready()
    index, payloads = coord.take_step()
    assert index == 0
    assert payloads == [u.key for u, _ in units]
    assert coord.learned_step == 1
    coord.mark_updated()
    assert coord.submit(units[0][0].key, "late", policy_version=0) is SubmitOutcome.DUPLICATE


def test_stale_trajectories_are_rejected_and_their_unit_reissued():
    coord = make(max_staleness=1)
    coord.policy_version = 3
    (unit, _), *_ = coord.lease("w0", 1, now=0.0)
    assert coord.submit(unit.key, "old", policy_version=1) is SubmitOutcome.STALE
    assert coord.submit(unit.key, "ok", policy_version=2) is SubmitOutcome.ACCEPTED


def test_sync_mode_opens_the_next_step_only_after_the_update():
    coord = make()
    for unit, _ in coord.lease("w0", 100, now=0.0):
        coord.submit(unit.key, unit.key, policy_version=0)
    coord.take_step()
    assert coord.lease("w0", 100, now=0.0) == []  # the update for step 0 is still running
    coord.mark_updated()
    assert {u.step for u, _ in coord.lease("w0", 100, now=0.0)} == {1}


def test_async_mode_leases_the_next_step_ahead():
    coord = make(max_staleness=1)
    units = coord.lease("w0", 100, now=0.0)
    assert {u.step for u, _ in units} == {0, 1}
    assert len(units) == 12


def test_unknown_units_are_reported():
    coord = make()
    assert coord.submit("9:nope:0", "x", policy_version=0) is SubmitOutcome.UNKNOWN
    assert coord.submit("garbage", "x", policy_version=0) is SubmitOutcome.UNKNOWN


@pytest.mark.parametrize("steps_done", [0, 1, 2, 3])
def test_resume_draws_the_same_questions(steps_done):
    straight = make()
    resumed = make()
    for _ in range(steps_done):
        for coord in (straight, resumed):
            for unit, _ in coord.lease("w", 100, now=0.0):
                coord.submit(unit.key, unit.key, 0)
            coord.take_step()
            coord.mark_updated()
    resumed.lease("w", 2, now=0.0)  # a step in flight when the checkpoint is taken
    restored = make()
    restored.load_state_dict(resumed.state_dict())
    expected = [u.key for u, _ in straight.lease("w", 100, now=0.0)]
    assert [u.key for u, _ in restored.lease("w", 100, now=0.0)] == expected


@pytest.mark.parametrize(("replicas", "first", "second"), [(1, 64, 36), (2, 50, 50), (4, 25, 25)])
def test_evaluation_is_leased_in_few_large_waves(tmp_path, replicas, first, second) -> None:
    """A worker runs each lease as one wave, so the 100 held-out questions go out in waves of up
    to 64 (what one engine batches), split evenly over the replicas, not 16 (the training batch)."""
    from types import SimpleNamespace

    from flowlane.api.flowrun import FlowRun
    from flowlane.trainer.learner_service import EvalRound, LearnerRuntime

    run = FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {
        "rollout": {"replicas": replicas}, "algorithm": {"groupSize": 4, "batchQuestions": 4}}})
    runtime = LearnerRuntime(run, tmp_path)
    runtime.learner, runtime.weights_cache = SimpleNamespace(policy_version=3), (3, [])
    runtime.eval_round = EvalRound("baseline", 3, list(runtime.eval_tasks))
    assert len(runtime.eval_tasks) == 100
    units, version = runtime.lease("w0/a", 0)
    more, _ = runtime.lease("w1/a", 0)
    assert (len(units), len(more), version) == (first, second, 3)
    assert all(u["eval"] and u["seed"] == 0 for u in units + more)
    assert not {u["unit_id"] for u in units} & {u["unit_id"] for u in more}
    runtime.eval_round = None  # training units keep the step's size: questions x group
    assert len(runtime.lease("w0/a", 0)[0]) == 16


def test_the_validation_split_is_carved_from_the_training_split_and_the_test_split_kept_apart(tmp_path) -> None:
    from flowlane.api.flowrun import FlowRun
    from flowlane.kit.tasks import load_tasks
    from flowlane.trainer.learner_service import LearnerRuntime

    run = FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {"schedule": {"validationFraction": 0.2}}})
    runtime = LearnerRuntime(run, tmp_path)
    train_split = load_tasks("arithmetic", "train")
    ids = {t.id for t in runtime.train_tasks}, {t.id for t in runtime.val_tasks}, {t.id for t in runtime.eval_tasks}
    assert len(ids[1]) == round(0.2 * len(train_split)) and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {t.id for t in train_split}  # nothing of the training split is lost
    assert not (ids[0] | ids[1]) & ids[2] and len(ids[2]) == 100  # the test split is the bundled test split
    again = LearnerRuntime(run, tmp_path)  # a restarted learner carves the same validation split
    assert [t.id for t in again.val_tasks] == [t.id for t in runtime.val_tasks]


def test_a_test_set_that_shares_questions_with_the_training_set_is_refused(tmp_path) -> None:
    import json

    from flowlane.api.errors import ConfigError
    from flowlane.api.flowrun import FlowRun
    from flowlane.trainer.learner_service import LearnerRuntime

    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "source": "mine"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
    run = FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {
        "tasks": {"dataset": str(tmp_path / "train.jsonl"), "split": "all"},
        "schedule": {"evalTasks": str(tmp_path / "test.jsonl"), "evalSplit": "all"}}})
    with pytest.raises(ConfigError, match=r"spec.schedule.evalSplit: 5 of the 5 questions of .* are also training"):
        LearnerRuntime(run, tmp_path)


def test_the_best_checkpoint_is_the_best_validated_step_and_survives_a_restart(tmp_path) -> None:
    """The learner names the best checkpoint by validation score (ties: the newer), steps without a
    validation score never become it, and a restarted learner reads it back from the store."""
    import asyncio
    import json
    from pathlib import Path

    from flowlane.api.flowrun import FlowRun
    from flowlane.kit.checkpoints import CheckpointStore
    from flowlane.trainer.learner_service import LearnerRuntime

    class Writer:  # the learner's checkpoint part: a model config and one weights file
        model_dir = tmp_path / "model"
        policy_version = 0

        def save_checkpoint_files(self, target: Path) -> dict:
            (target / "model.bin").write_bytes(b"weights")
            return {}

    Writer.model_dir.mkdir()
    (Writer.model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    run = FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {}})
    (tmp_path / "run").mkdir()
    runtime = LearnerRuntime(run, tmp_path / "run")
    runtime.learner = Writer()
    runtime.store = CheckpointStore.from_uri(f"file://{tmp_path / 'ckpt'}", keep_last=1)
    for step, validated in ((1, 0.4), (2, None), (3, 0.6), (4, 0.5), (5, 0.6), (6, None)):
        runtime.coordinator.learned_step = step
        runtime._validated = None if validated is None else (step, validated)
        asyncio.run(runtime.checkpoint())
    assert runtime.progress.last_checkpoint.endswith("step-00000006")
    assert runtime.progress.best_checkpoint.endswith("step-00000005")
    assert runtime.progress.best_validation_accuracy == 0.6

    restarted = LearnerRuntime(run, tmp_path / "run")
    restarted.learner = Writer()
    restarted.store = runtime.store
    restarted.learner.load_checkpoint_files = lambda path: None  # type: ignore[attr-defined]
    assert restarted.restore()
    assert (restarted.progress.best_checkpoint, restarted.progress.best_validation_accuracy) == (
        runtime.progress.best_checkpoint, 0.6)


async def test_a_submission_before_the_learner_has_loaded_is_unavailable_so_the_worker_retries(tmp_path) -> None:
    """A rollout worker that outlived a learner restart submits what it rolled out while the new
    learner is still loading: the answer is UNAVAILABLE (the worker's retry code), not an error
    that kills the worker. Once the planner is loaded and published the same call is answered."""
    import grpc

    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.api.flowrun import FlowRun
    from flowlane.kit.grpc_common import bind_port, create_server, open_channel
    from flowlane.trainer.learner_service import LearnerRuntime, make_servicer

    runtime = LearnerRuntime(FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {}}), tmp_path)
    server = create_server("t0ken")
    learner_pb2_grpc.add_LearnerServicer_to_server(make_servicer(runtime), server)
    address = f"127.0.0.1:{bind_port(server, '127.0.0.1', 0)}"
    await server.start()

    class Policy:
        policy_version = 2

    async def submit(stub) -> learner_pb2.SubmitAck:
        async def chunks():
            yield learner_pb2.TrajectoryChunk()

        return await stub.SubmitTrajectories(chunks(), timeout=10)

    try:
        async with open_channel(address, "t0ken") as channel:
            stub = learner_pb2_grpc.LearnerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await submit(stub)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in raised.value.details()
            runtime.learner = Policy()  # built, not yet restored and published: still unavailable
            with pytest.raises(grpc.aio.AioRpcError):
                await submit(stub)
            runtime.weights_cache = (2, [])
            ack = await submit(stub)
            assert (ack.policy_version, ack.accepted, ack.rejected) == (2, 0, 0)
    finally:
        await server.stop(None)


def test_question_batches_are_the_questions_a_run_trains_on_step_by_step_across_epochs():
    from flowlane.trainer.coordinator import question_batches

    coord = make()  # 5 questions, 2 per step: step 3 starts the second epoch's order
    trained = []
    for _ in range(6):
        units = coord.lease("w0", 100, now=0.0)
        for unit, _ in units:
            coord.submit(unit.key, "payload", policy_version=coord.policy_version)
        coord.take_step()
        coord.mark_updated()
        trained.append(list(dict.fromkeys(task.id for _, task in units)))
    batches = question_batches(TASKS, questions_per_step=2, steps=6, seed=7)
    assert [[task.id for task in batch] for batch in batches] == trained
    flat = [question for batch in trained for question in batch]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == ["q0", "q1", "q2", "q3", "q4"]  # two whole epochs
