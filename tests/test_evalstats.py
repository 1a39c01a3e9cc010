"""Evaluation intervals: Wilson for one accuracy, paired for the gain, and what an evaluation round logs."""

from __future__ import annotations

import math

import pytest

from flowlane.kit.evalstats import Z95, mcnemar_exact_p, paired_gain, wilson_interval


def test_wilson_interval_closed_forms_at_the_ends() -> None:
    # At 0 successes the interval is [0, z^2 / (n + z^2)], at n it is [n / (n + z^2), 1].
    z2 = Z95 * Z95
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_of_sixty_in_a_hundred() -> None:
    low, high = wilson_interval(60, 100)
    assert (low, high) == pytest.approx((0.50200, 0.69060), abs=1e-5)
    assert low + high == pytest.approx(2 * (0.6 + Z95 ** 2 / 200) / (1 + Z95 ** 2 / 100), abs=1e-12)  # the centre


def test_wilson_interval_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="successes must be in"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(("fixed", "broken", "p"), [
    (0, 0, 1.0), (5, 0, 2 / 32), (0, 5, 2 / 32), (3, 1, 2 * 5 / 16), (2, 2, 1.0), (10, 2, 2 * 79 / 4096)])
def test_mcnemar_exact_p(fixed: int, broken: int, p: float) -> None:
    assert mcnemar_exact_p(fixed, broken) == pytest.approx(p, abs=1e-12)


def test_paired_gain_counts_the_changed_questions() -> None:
    before = {"a": True, "b": False, "c": False, "d": True}
    after = {"a": True, "b": True, "c": True, "d": False}
    gain = paired_gain(before, after)
    assert (gain.n, gain.fixed, gain.broken, gain.before, gain.after) == (4, 2, 1, 0.5, 0.75)
    assert gain.gain == pytest.approx(0.25, abs=1e-12)
    half = Z95 * math.sqrt((3 / 4 - 1 / 16) / 4)  # Var(d) = E[d^2] - E[d]^2 over n
    assert 0.25 + half > 1.0  # four questions say little: the interval is clipped to the possible gains
    assert (gain.ci_low, gain.ci_high) == pytest.approx((0.25 - half, 1.0), abs=1e-12)
    assert gain.p_value == 1.0
    metrics = gain.metrics("test/gain")
    assert metrics["test/gain"] == pytest.approx(0.25) and metrics["test/gain_fixed"] == 2.0


def test_a_gain_where_nothing_changed_has_a_zero_width_interval() -> None:
    same = {str(i): i % 2 == 0 for i in range(10)}
    gain = paired_gain(same, same)
    assert (gain.gain, gain.ci_low, gain.ci_high, gain.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_gain_needs_the_same_questions() -> None:
    with pytest.raises(ValueError, match="same questions; 2 differ"):
        paired_gain({"a": True}, {"b": True})


def _trajectory(reward: float, turns: int, tokens: int):
    from flowlane.api.trajectory import Step, Trajectory

    return Trajectory(question="q", answer="1", reward=reward, generated_tokens=tokens,
                      steps=[Step(turn=i, tool_name="python", sub_goal="") for i in range(turns)])


def test_an_evaluation_round_logs_its_interval_turns_and_tokens() -> None:
    from flowlane.kit.tasks import Task
    from flowlane.trainer.learner_records import EvalRound

    tasks = [Task(id=f"q{i}", question=f"{i}?", answer=str(i), source="t") for i in range(5)]
    round_ = EvalRound("test-baseline", 0, tasks)
    for task, (reward, turns) in zip(tasks, [(1.0, 1), (0.0, 3), (1.0, 2), (1.0, 1), (0.0, 3)], strict=True):
        round_.results[round_.unit_id(task)] = _trajectory(reward, turns, 10 * turns)
    assert round_.correct() == {"q0": True, "q1": False, "q2": True, "q3": True, "q4": False}
    metrics = round_.metrics("test")
    low, high = wilson_interval(3, 5)
    assert metrics == {"test/accuracy": 0.6, "test/accuracy_ci_low": low, "test/accuracy_ci_high": high,
                       "test/questions": 5.0, "test/turns_per_trajectory": 2.0, "test/generated_tokens": 100.0}


def test_the_final_round_is_paired_with_the_baseline(tmp_path) -> None:
    from flowlane.api.flowrun import FlowRun
    from flowlane.trainer.learner_service import LearnerRuntime

    class Recorder:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            self.logged.update(metrics)

    runtime = LearnerRuntime(FlowRun.model_validate({"metadata": {"name": "x"}, "spec": {}}), tmp_path)
    runtime.tracker = Recorder()  # type: ignore[assignment]
    runtime.baseline_correct = {"a": False, "b": False, "c": True}
    runtime._log_gain({"a": True, "b": False, "c": True})
    logged = runtime.tracker.logged  # type: ignore[attr-defined]
    assert logged["test/gain"] == pytest.approx(1 / 3) and logged["test/gain_fixed"] == 1.0
    assert logged["test/gain_broken"] == 0.0 and logged["test/gain_p_value"] == 1.0
    runtime.tracker = Recorder()  # type: ignore[assignment]
    runtime._log_gain({"a": True})  # other questions than the baseline's: nothing to pair, nothing logged
    assert runtime.tracker.logged == {}  # type: ignore[attr-defined]
