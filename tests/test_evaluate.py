"""`flowlane eval`: scores a planner on a held-out split, prints the table and logs to MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs the real `flowlane eval` process (engine, agent, MLflow)

FLOWLANE = [str(Path(sys.executable).parent / "flowlane")]


def run_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOWLANE, "eval", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_eval_scores_a_held_out_split_and_logs_it_to_mlflow(tmp_path: Path, model_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The transformers engine keeps this quick; --fixed gives the other modules their own frozen engine.
    result = run_eval("--model", str(model_dir), "--fixed", "smollm2-135m-instruct", "--engine", "transformers",
                      "--tasks", "arithmetic", "--split", "test", "--limit", "3", "--max-turns", "1",
                      "--tools", "python", "--mlflow-uri", uri, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("flowlane-eval")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    accuracy = run.data.metrics["eval/accuracy"]
    assert round(accuracy * 3) / 3 == accuracy  # k of 3 questions
    assert run.data.metrics["eval/accuracy/arithmetic"] == accuracy
    assert run.data.params["fixed"] == "smollm2-135m-instruct" and run.data.params["split"] == "test"
    assert f"{accuracy:.3f}" in result.stdout  # the printed table says the same
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts  # sample trajectories


def test_eval_of_a_model_that_does_not_exist_is_one_clear_error(tmp_path: Path) -> None:
    result = run_eval("--model", str(tmp_path / "no-such-model"), "--limit", "1", "--no-track", cwd=tmp_path)
    assert result.returncode != 0
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
