"""MLflow tracking against a real ``mlflow server`` on loopback, and its offline fallback.

Every test uses its own experiment name: the server lives for the whole session.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_services import free_port
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from safetensors.numpy import load_file, save_file

from flowlane.api.trajectory import PlannerTurn, Step, StopReason, Trajectory, Verdict
from flowlane.kit.tracking import (
    MODEL_TYPE,
    OFFLINE_LOG,
    RunStatus,
    Tracker,
    render_trajectory,
    to_metrics,
    to_params,
)

SPEC = {"model": {"name": "smollm2-135m"}, "training": {"lr": 1e-6, "groupSize": 8}, "tools": ["python", "search"]}


def experiment_name() -> str:
    return f"flowrun-{uuid.uuid4().hex[:8]}"


def sample_trajectory(reward: float = 1.0) -> Trajectory:
    return Trajectory(
        question="What is 6 times 7?",
        question_id="q-1",
        gold_answer="42",
        query_analysis="Arithmetic; use Python.",
        steps=[
            Step(
                turn=1,
                tool_name="python_coder",
                sub_goal="compute 6*7",
                command="print(6*7)",
                result="42",
                verdict=Verdict.STOP,
                verifier_reason="the result answers the question",
                duration_s=0.1,
            )
        ],
        planner_turns=[
            PlannerTurn(prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.5, -0.25], policy_version=3)
        ],
        answer="42",
        reward=reward,
        stop_reason=StopReason.VERIFIER_STOP,
        tool_calls={"python_coder": 1},
    )


def tracker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "flowlane.kit.tracking" and r.levelno == logging.WARNING
    ]


def offline_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / OFFLINE_LOG).read_text().splitlines()]


# --------------------------------------------------------------------------------- against a server


def test_params_and_per_step_metrics_appear_on_the_server(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(experiment_name(), run_dir=tmp_path, tracking_uri=mlflow_server)
    run_id = tracker.start_run("attempt-1", SPEC, tags={"flowlane.attempt": "1"})
    assert run_id is not None
    tracker.log_metrics(1, {"reward": {"mean": 0.25, "std": 0.5}, "tool_calls": {"python_coder": 3}})
    tracker.log_metrics(2, {"reward": {"mean": 0.5, "std": 0.25}, "tool_calls": {"python_coder": 5}})
    tracker.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "reward/mean")

    assert run.data.params == {
        "model.name": "smollm2-135m",
        "training.lr": "1e-06",
        "training.groupSize": "8",
        "tools": '["python", "search"]',
    }
    assert run.data.tags["flowlane.attempt"] == "1"
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert run.data.metrics["tool_calls/python_coder"] == 5.0
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == tracker.experiment


def test_trajectory_artifacts_hold_the_full_record_and_a_readable_rendering(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(experiment_name(), run_dir=tmp_path / "run", tracking_uri=mlflow_server)
    run_id = tracker.start_run("attempt-1", SPEC)
    trajectories = [sample_trajectory(1.0), sample_trajectory(0.0)]
    tracker.log_trajectories(12, trajectories)

    client = MlflowClient(mlflow_server)
    listed = sorted(f.path for f in client.list_artifacts(run_id, "trajectories"))
    local = Path(client.download_artifacts(run_id, "trajectories", str(tmp_path)))
    records = json.loads((local / "step-00000012.json").read_text())
    rendering = (local / "step-00000012.md").read_text()

    assert listed == ["trajectories/step-00000012.json", "trajectories/step-00000012.md"]
    assert [Trajectory.from_dict(r) for r in records] == trajectories
    for needle in ("What is 6 times 7?", "`python_coder`", "print(6*7)", "Verdict:** STOP", "reward 1.0", "> 42"):
        assert needle in rendering


def test_final_planner_is_logged_as_a_model_linked_to_the_run(mlflow_server: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "planner"
    model_dir.mkdir()
    weights = {"lm_head.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    save_file(weights, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    tracker = Tracker(experiment_name(), run_dir=tmp_path / "run", tracking_uri=mlflow_server)
    run_id = tracker.start_run("attempt-1", SPEC)

    model_id = tracker.log_model(model_dir, step=40)

    client = MlflowClient(mlflow_server)
    assert model_id is not None
    model = client.get_logged_model(model_id)
    fetched = Path(
        download_artifacts(
            artifact_uri=model.artifact_location, dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server
        )
    )
    assert model.source_run_id == run_id
    assert model.model_type == MODEL_TYPE
    assert model.status.value == "READY"
    assert client.get_run(run_id).data.tags["flowlane.model_id"] == model_id
    assert sorted(p.name for p in fetched.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(
        load_file(str(fetched / "model.safetensors"))["lm_head.weight"], weights["lm_head.weight"]
    )


def test_two_runs_are_compared_with_search_runs(mlflow_server: str, tmp_path: Path) -> None:
    name = experiment_name()
    for attempt, accuracy in (("lr-1e-6", 0.3), ("lr-3e-6", 0.7)):
        tracker = Tracker(name, run_dir=tmp_path / attempt, tracking_uri=mlflow_server)
        tracker.start_run(attempt, {**SPEC, "training": {"lr": attempt}})
        tracker.log_metrics(10, {"accuracy": accuracy})
        tracker.end()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["metrics.accuracy DESC"])

    assert [(r.info.run_name, r.data.metrics["accuracy"]) for r in runs] == [("lr-3e-6", 0.7), ("lr-1e-6", 0.3)]


def test_a_failed_training_ends_its_run_as_failed(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(experiment_name(), run_dir=tmp_path, tracking_uri=mlflow_server)
    run_id = tracker.start_run("attempt-1", SPEC)

    with pytest.raises(ZeroDivisionError), tracker:
        tracker.log_metrics(1, {"loss": 1.0})
        _ = 1 / 0

    assert run_id is not None
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == RunStatus.FAILED.value


# ------------------------------------------------------------------------------- when MLflow fails


def test_unreachable_server_warns_once_and_training_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    tracker = Tracker(experiment_name(), run_dir=tmp_path, tracking_uri=dead)
    run_id = tracker.start_run("attempt-1", SPEC)
    for step in (1, 2, 3):
        tracker.log_metrics(step, {"reward": {"mean": step / 4}})
    tracker.log_trajectories(3, [sample_trajectory()])
    assert tracker.log_model(tmp_path) is None
    tracker.end()
    elapsed_s = time.monotonic() - started

    records = offline_records(tmp_path)
    assert run_id is None
    assert elapsed_s < 5
    assert len(tracker_warnings(caplog)) == 1
    assert dead in tracker_warnings(caplog)[0] and "training continues" in tracker_warnings(caplog)[0]
    assert [r["kind"] for r in records] == ["start", "metrics", "metrics", "metrics", "trajectories", "model", "end"]
    assert [r["values"] for r in records if r["kind"] == "metrics"] == [
        {"reward/mean": 0.25},
        {"reward/mean": 0.5},
        {"reward/mean": 0.75},
    ]
    assert (tmp_path / "mlflow-offline/trajectories/step-00000003.md").read_text().count("What is 6 times 7?") == 1


def test_server_lost_mid_run_degrades_to_the_offline_log(
    mlflow_server: str, tcp_link: Callable[[int], Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = tcp_link(int(mlflow_server.rsplit(":", 1)[1]))
    tracker = Tracker(experiment_name(), run_dir=tmp_path, tracking_uri=link.url)
    run_id = tracker.start_run("attempt-1", SPEC)
    tracker.log_metrics(1, {"loss": 1.0})

    link.cut()
    started = time.monotonic()
    tracker.log_metrics(2, {"loss": 0.5})
    tracker.log_metrics(3, {"loss": 0.25})
    elapsed_s = time.monotonic() - started

    history = MlflowClient(mlflow_server).get_metric_history(str(run_id), "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0)]
    assert [(r["step"], r["values"]) for r in offline_records(tmp_path)] == [(2, {"loss": 0.5}), (3, {"loss": 0.25})]
    assert len(tracker_warnings(caplog)) == 1
    assert tracker.degraded
    assert elapsed_s < 10


# ------------------------------------------------------------------------------ the embedded store


def test_embedded_default_is_a_sqlite_store_under_the_run_dir(tmp_path: Path) -> None:
    tracker = Tracker("local-run", run_dir=tmp_path)
    run_id = tracker.start_run("attempt-1", SPEC)
    tracker.log_metrics(1, {"reward": {"mean": 0.5}})
    tracker.log_trajectories(1, [sample_trajectory()])
    tracker.end()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_id is not None and not tracker.degraded
    assert client.get_run(run_id).data.metrics == {"reward/mean": 0.5}
    assert (tmp_path / "mlartifacts").is_dir()
    assert [f.path for f in client.list_artifacts(run_id, "trajectories")] == [
        "trajectories/step-00000001.json",
        "trajectories/step-00000001.md",
    ]


# ------------------------------------------------------------------------------------ pure helpers


def test_params_are_flattened_with_dotted_keys_and_bounded_values() -> None:
    params = to_params({"a": {"b": {"c": 1}}, "flag": True, "none": None, "long": "x" * 7000, "bad key!": 1})

    assert params == {"a.b.c": "1", "flag": "True", "none": "None", "long": "x" * 6000, "bad key_": "1"}


def test_metrics_nest_with_slashes_and_drop_what_is_not_a_number() -> None:
    metrics = to_metrics({"tool_errors": {"python": 2, "search": 0}, "lr": 1e-6, "note": "hi", "nan": float("nan")})

    assert metrics == {"tool_errors/python": 2.0, "tool_errors/search": 0.0, "lr": 1e-6}


def test_rendering_lists_each_step_and_the_outcome() -> None:
    text = render_trajectory(sample_trajectory(0.0), index=3)

    assert text.splitlines()[0] == "## Trajectory 3 (q-1): reward 0.0"
    assert "**Gold answer:** 42" in text
    assert "- **Sub-goal:** compute 6*7" in text
    assert "- **Verdict:** STOP: the result answers the question" in text
    assert "stop: verifier_stop; planner turns: 1; tool calls: python_coder=1" in text
