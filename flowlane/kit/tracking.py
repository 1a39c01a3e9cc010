"""Experiment tracking: every FlowRun's params, per-step metrics, sample trajectories and final model
in MLflow, so runs can be compared; and never a reason for training to stop.

MLflow is a convenience, training is the job. So the :class:`Tracker` never raises into the
training loop: the first time MLflow fails (unreachable at start, or gone mid-run) it logs **one**
warning and from then on appends everything to ``<run_dir>/mlflow-offline.jsonl`` (artifacts to
``<run_dir>/mlflow-offline/``), which keeps the numbers for later. HTTP waits are bounded: the
tracker probes a server's ``/health`` with a short timeout before using it, and it sets MLflow's
HTTP retry/timeout environment variables (unless already set) so a dead server costs seconds,
not the minutes of MLflow's defaults.

Where the data goes:

- ``tracking_uri=None`` is the embedded default: a sqlite store ``<run_dir>/mlflow.db`` with
  artifacts in ``<run_dir>/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///...`` shows it).
- ``http://host:port`` is an ``mlflow server``; any other URI MLflow understands also works.

One experiment per FlowRun (the name is the caller's choice, usually the FlowRun name); one
MLflow run per training attempt. The final planner is logged as an MLflow 3 *logged model*
(``create_logged_model`` + ``log_model_artifacts``): the model directory (safetensors, config,
tokenizer) is uploaded as-is, linked to the run, typed ``flowlane-planner``. We deliberately do
not use ``mlflow.transformers.log_model``: it loads the model into memory, may reach for the Hub
and writes a pipeline wrapper nobody here needs, while the plain directory is exactly what
transformers and vLLM load (``AutoModelForCausalLM.from_pretrained(dir)``, ``LLM(dir)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from flowlane.api.trajectory import Trajectory

log = logging.getLogger(__name__)
T = TypeVar("T")

OFFLINE_LOG = "mlflow-offline.jsonl"
OFFLINE_ARTIFACTS = "mlflow-offline"
MODEL_TYPE = "flowlane-planner"
MODEL_TAGS = {
    "flowlane.format": "transformers model directory (safetensors + config + tokenizer)",
    "flowlane.load": "download the artifacts, then AutoModelForCausalLM.from_pretrained(dir) or vllm LLM(dir)",
}
MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 6000
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


class RunStatus(StrEnum):
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


# ----------------------------------------------------------------------------------- pure helpers


def flatten(nested: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"rollout": {"replicas": 2}}`` -> ``{"rollout.replicas": 2}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def to_params(spec: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params from a (nested) spec: dotted keys, string values within MLflow's limits."""
    params = {}
    for key, value in flatten(spec).items():
        if isinstance(value, str):
            text = value
        elif value is None or isinstance(value, bool | int | float):
            text = str(value)
        else:
            text = json.dumps(value, sort_keys=True, default=str)
        params[sanitize_key(key)[:MAX_PARAM_KEY]] = text[:MAX_PARAM_VALUE]
    return params


def to_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics from a (nested) mapping, ``/``-joined; non-numbers are dropped."""
    metrics = {}
    for key, value in flatten(values, sep="/").items():
        if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            metrics[sanitize_key(key)] = float(value)
    return metrics


def sanitize_key(key: str) -> str:
    """MLflow accepts letters, digits and ``_-. :/`` in names; anything else becomes ``_``."""
    return _UNSAFE_KEY_CHARS.sub("_", key)


def render_trajectory(traj: Trajectory, index: int | None = None) -> str:
    """A human-readable Markdown rendering of one trajectory (the JSON artifact has everything)."""
    title = f"Trajectory {index}" if index is not None else "Trajectory"
    if traj.question_id:
        title += f" ({traj.question_id})"
    lines = [f"## {title}: reward {traj.reward if traj.reward is not None else 'n/a'}", ""]
    lines += [f"**Question:** {traj.question}", ""]
    if traj.gold_answer is not None:
        lines += [f"**Gold answer:** {traj.gold_answer}", ""]
    if traj.query_analysis:
        lines += ["**Query analysis:**", "", _quote(traj.query_analysis), ""]
    for step in traj.steps:
        lines += [f"### Turn {step.turn}: `{step.tool_name}`", ""]
        lines += [f"- **Sub-goal:** {step.sub_goal}"]
        if step.context:
            lines += [f"- **Context:** {step.context}"]
        if step.justification:
            lines += [f"- **Justification:** {step.justification}"]
        status = "ok" if step.tool_ok else "tool error"
        lines += [
            f"- **Verdict:** {step.verdict.value}" + (f": {step.verifier_reason}" if step.verifier_reason else "")
        ]
        lines += [f"- **Tool result** ({status}, {step.duration_s:.2f}s):", ""]
        if step.command:
            lines += ["```text", step.command, "```", ""]
        lines += ["```text", step.result, "```", ""]
    lines += ["### Answer", "", _quote(traj.answer or "(none)"), ""]
    stats = [f"stop: {traj.stop_reason.value}", f"planner turns: {len(traj.planner_turns)}"]
    if traj.tool_calls:
        stats.append("tool calls: " + ", ".join(f"{k}={v}" for k, v in sorted(traj.tool_calls.items())))
    if traj.tool_errors:
        stats.append("tool errors: " + ", ".join(f"{k}={v}" for k, v in sorted(traj.tool_errors.items())))
    if traj.parse_failures:
        stats.append("parse failures: " + ", ".join(f"{k}={v}" for k, v in sorted(traj.parse_failures.items())))
    lines += ["_" + "; ".join(stats) + f"; {traj.duration_s:.1f}s_", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in text.splitlines() or [""])


def bound_mlflow_http_waits(timeout_s: float) -> None:
    """Make MLflow's HTTP client give up in seconds (only where the user has not chosen values)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int for MLflow
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))


# -------------------------------------------------------------------------------------------- shell


class Tracker:
    """MLflow for one training attempt; degrades to a local JSONL log instead of ever raising."""

    def __init__(
        self,
        experiment: str,
        *,
        run_dir: Path,
        tracking_uri: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.embedded = tracking_uri is None
        self.tracking_uri = tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.timeout_s = timeout_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_id: str | None = None
        self.degraded_reason: str | None = None
        self._client: Any = None
        bound_mlflow_http_waits(timeout_s)

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None

    @property
    def offline_log(self) -> Path:
        return self.run_dir / OFFLINE_LOG

    # -- lifecycle

    def start_run(
        self,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        *,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Open the experiment (created if missing) and a run; returns the run id, or None offline.

        ``resume_run_id`` continues that run (a learner restarted from a checkpoint), so one
        training run stays one MLflow run across restarts; params are not logged again.
        """
        flat_params = to_params(params)
        all_tags = {"flowlane.flowrun": self.experiment, **(tags or {})}

        def start() -> str:
            client = self._connect()
            self.experiment_id = self._experiment_id(client)
            if resume_run_id:
                run = client.get_run(resume_run_id)
                self.run_id = run.info.run_id
                client.update_run(self.run_id, status="RUNNING")
                return str(self.run_id)
            run = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self._log_batch(params=flat_params)
            return str(self.run_id)

        ok, run_id = self._guard("starting the MLflow run", start)
        if not ok:
            self._offline({"kind": "start", "run_name": run_name, "params": flat_params, "tags": all_tags})
        return run_id

    def end(self, status: RunStatus = RunStatus.FINISHED) -> None:
        """Mark the run finished (or failed/killed). Offline, the status goes to the JSONL log."""
        status = RunStatus(status)
        if self.run_id is None:
            self._offline({"kind": "end", "status": status.value})
        elif self.degraded:
            self._offline({"kind": "end", "status": status.value})
            try:  # the server may be back: do not leave the run RUNNING forever
                self._client.set_terminated(self.run_id, status=status.value)
            except Exception as exc:
                log.debug("could not end MLflow run %s: %s", self.run_id, exc)
        else:
            run_id = self.run_id
            self._guard("ending the MLflow run", lambda: self._client.set_terminated(run_id, status=status.value))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(RunStatus.FINISHED if exc_type is None else RunStatus.FAILED)

    # -- logging

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log one step's metrics; nested mappings (e.g. per-tool counts) become ``a/b`` names."""
        values = to_metrics(metrics)
        if not values:
            return
        ok, _ = self._guard("logging metrics", lambda: self._log_batch(metrics=values, step=step))
        if not ok:
            self._offline({"kind": "metrics", "step": step, "values": values})

    def log_trajectories(self, step: int, trajectories: Sequence[Trajectory]) -> None:
        """Sample trajectories as ``trajectories/step-<08d>.json`` (full records) and ``.md`` (readable)."""
        if not trajectories:
            return
        stem = f"trajectories/step-{step:08d}"
        as_json = json.dumps([t.to_dict() for t in trajectories], indent=1)
        header = f"# Step {step}: {len(trajectories)} sample trajectories\n\n"
        as_md = header + "\n".join(render_trajectory(t, i) for i, t in enumerate(trajectories))

        def upload() -> None:
            run_id = self._require_run()
            self._client.log_text(run_id, as_json, f"{stem}.json")
            self._client.log_text(run_id, as_md, f"{stem}.md")

        ok, _ = self._guard("logging trajectories", upload)
        if not ok:
            for suffix, text in ((".json", as_json), (".md", as_md)):
                path = self.run_dir / OFFLINE_ARTIFACTS / f"{stem}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            self._offline({"kind": "trajectories", "step": step, "path": f"{OFFLINE_ARTIFACTS}/{stem}.json"})

    def log_model(self, model_dir: Path, *, name: str = "planner", step: int = 0) -> str | None:
        """Log the final planner directory as an MLflow logged model; returns its id, or None offline."""
        model_dir = Path(model_dir)
        files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())

        def upload() -> str:
            from mlflow.entities import LoggedModelOutput, LoggedModelStatus

            run_id = self._require_run()
            model = self._client.create_logged_model(
                self.experiment_id,
                name=name,
                source_run_id=run_id,
                model_type=MODEL_TYPE,
                tags=MODEL_TAGS,
                params={"files": json.dumps(files)[:MAX_PARAM_VALUE], "step": str(step)},
            )
            try:
                self._client.log_model_artifacts(model.model_id, str(model_dir))
            except Exception:
                self._client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                raise
            self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            self._client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
            self._client.set_tag(run_id, "flowlane.model_id", model.model_id)
            self.model_id = str(model.model_id)
            return self.model_id

        ok, model_id = self._guard("logging the model", upload)
        if not ok:
            self._offline({"kind": "model", "name": name, "step": step, "path": str(model_dir.resolve())})
        return model_id

    # -- internals

    def _connect(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith(("http://", "https://")):
            import requests

            try:
                requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=min(self.timeout_s, 3.0))
            except requests.RequestException as exc:
                raise ConnectionError(f"no answer from {self.tracking_uri}/health ({type(exc).__name__})") from None
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self, client: Any) -> str:
        existing = client.get_experiment_by_name(self.experiment)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                client.restore_experiment(existing.experiment_id)
            return str(existing.experiment_id)
        location = (self.run_dir / "mlartifacts").resolve().as_uri() if self.embedded else None
        try:
            return str(client.create_experiment(self.experiment, artifact_location=location))
        except Exception:
            raced = client.get_experiment_by_name(self.experiment)  # another learner created it meanwhile
            if raced is None:
                raise
            return str(raced.experiment_id)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run: call start_run() first")
        return self.run_id

    def _log_batch(
        self, *, metrics: Mapping[str, float] | None = None, params: Mapping[str, str] | None = None, step: int = 0
    ) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._require_run()
        now_ms = int(time.time() * 1000)
        metric_list = [Metric(k, v, now_ms, step) for k, v in (metrics or {}).items()]
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        for chunk in _chunks(metric_list, _BATCH_METRICS):
            self._client.log_batch(run_id, metrics=chunk)
        for chunk in _chunks(param_list, _BATCH_PARAMS):
            self._client.log_batch(run_id, params=chunk)

    def _guard(self, what: str, action: Callable[[], T]) -> tuple[bool, T | None]:
        """Run ``action`` unless degraded: ``(True, result)``, or ``(False, None)`` after degrading.

        The first failure logs the one warning and switches the tracker to the offline log.
        """
        if self.degraded:
            return False, None
        try:
            return True, action()
        except Exception as exc:
            self.degraded_reason = f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning(
                "MLflow at %s failed while %s; training continues and tracking goes to %s from now on",
                self.tracking_uri,
                self.degraded_reason,
                self.offline_log,
            )
            return False, None

    def _offline(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), "experiment": self.experiment, **record}
        try:
            with self.offline_log.open("a") as out:
                out.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:  # even the fallback failing must not stop training
            log.debug("cannot append to %s: %s", self.offline_log, exc)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
