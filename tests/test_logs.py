"""One logging setup (flowlane.kit.logs): JSON with the run's context as fields, or plain text."""

from __future__ import annotations

import io
import json
import logging

import pytest

from flowlane.kit import logs


@pytest.fixture(autouse=True)
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], _ = handlers, root.setLevel(level)
    logs.set_context(component=None, run=None, step=None, policy_version=None, worker=None)


def test_json_lines_carry_component_run_step_and_policy_version() -> None:
    out = io.StringIO()
    logs.configure("learner", run="demo", log_format="json", stream=out)
    logs.set_context(step=3, policy_version=2)
    logging.getLogger("flowlane.learner").info("step %d done", 3)
    entry = json.loads(out.getvalue())
    assert entry["message"] == "step 3 done" and entry["severity"] == "info"
    assert (entry["component"], entry["run"], entry["step"], entry["policy_version"]) == ("learner", "demo", 3, 2)


def test_a_records_own_extra_wins_over_the_context() -> None:
    out = io.StringIO()
    logs.configure("learner", log_format="json", stream=out)
    logs.set_context(step=3)
    logging.getLogger("x").warning("late", extra={"step": 4})
    assert json.loads(out.getvalue())["step"] == 4


def test_text_lines_show_the_context_in_brackets() -> None:
    out = io.StringIO()
    logs.configure("rollout", run="demo", log_format="text", stream=out)
    logs.set_context(policy_version=7)
    logging.getLogger("flowlane.rollout").info("loaded")
    assert out.getvalue().rstrip().endswith("INFO flowlane.rollout [rollout demo policy_version=7]: loaded")


def test_json_is_the_default_in_a_pod_and_the_env_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.LOG_FORMAT_ENV, raising=False)
    monkeypatch.delenv(logs.IN_POD_ENV, raising=False)
    assert logs.resolve_format() is logs.LogFormat.TEXT
    monkeypatch.setenv(logs.IN_POD_ENV, "10.0.0.1")
    assert logs.resolve_format() is logs.LogFormat.JSON
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
    assert logs.resolve_format() is logs.LogFormat.TEXT
    assert logs.resolve_format("json") is logs.LogFormat.JSON


def test_an_unknown_format_names_the_choices() -> None:
    with pytest.raises(ValueError, match="log format 'yaml': use json or text"):
        logs.resolve_format("yaml")


def test_kopf_object_references_become_the_object_field() -> None:
    out = io.StringIO()
    logs.configure("operator", log_format="json", stream=out)
    ref = {"namespace": "ns", "name": "demo", "kind": "FlowRun"}
    logging.getLogger("kopf.objects").info("reconciled", extra={"k8s_ref": ref, "k8s_skip": False})
    entry = json.loads(out.getvalue())
    assert entry["object"] == ref and "k8s_skip" not in entry and "k8s_ref" not in entry
