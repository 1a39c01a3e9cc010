"""`flowlane run` with stdout redirected reports each step on its own plain line."""

from __future__ import annotations

from flowlane.api import learner_pb2
from flowlane.operator.run_command import progress_line


def test_a_step_line_has_step_reward_accuracy_and_an_eta_from_the_mean_step_time() -> None:
    status = learner_pb2.LearnerStatus(step=3, reward_mean=0.5, validation_accuracy=0.25)
    # 3 of 10 steps in 90 s: 30 s a step, 7 steps (210 s) to go
    assert progress_line(status, 10, 90.0) == "step 3/10 reward 0.500 validation 0.250 elapsed 0:01:30 eta 0:03:30"


def test_before_the_first_step_the_eta_and_an_unmeasured_accuracy_are_unknown() -> None:
    status = learner_pb2.LearnerStatus(step=0, reward_mean=0.0, message="baseline eval")
    assert progress_line(status, 10, 5.0) == "step 0/10 reward 0.000 validation - elapsed 0:00:05 eta - | baseline eval"


def test_the_line_after_training_adds_the_test_accuracy() -> None:
    status = learner_pb2.LearnerStatus(step=10, reward_mean=0.5, validation_accuracy=0.6, held_out_accuracy=0.7)
    assert progress_line(status, 10, 300.0) == (
        "step 10/10 reward 0.500 validation 0.600 elapsed 0:05:00 eta 0:00:00 test 0.700")
