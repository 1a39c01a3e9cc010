"""``flowlane run`` checks the sandbox layers up front: on a machine without them it says so once,
naming the missing layers and the opt-out, and starts nothing (instead of a sandbox component
that fails in a restart loop).

Missing kernel features are simulated by replacing the probe; the last test uses the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from flowlane import cli
from flowlane.api.errors import ConfigError
from flowlane.api.flowrun import load_flowrun
from flowlane.operator import run_command
from flowlane.runtime.sandbox import runner
from flowlane.runtime.sandbox.layers import IsolationLayer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flowrun.yaml"
WITHOUT_KERNEL_LAYERS = tuple(
    set(IsolationLayer) - {IsolationLayer.SECCOMP, IsolationLayer.LANDLOCK, IsolationLayer.NON_DUMPABLE_CALLER})


def flowrun_file(tmp_path: Path, *, allow_weak_isolation: bool) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["sandbox"]["allowWeakIsolation"] = allow_weak_isolation
    path = tmp_path / "flowrun.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def machine_without_seccomp_and_landlock(monkeypatch: pytest.MonkeyPatch) -> None:
    async def probe(*args: object) -> tuple[IsolationLayer, ...]:
        return WITHOUT_KERNEL_LAYERS

    monkeypatch.setattr(runner, "probe_isolation", probe)
    monkeypatch.setattr(run_command, "check_fits", lambda flowrun: None)


def test_flowlane_run_without_the_kernel_layers_exits_2_with_one_line_naming_them_and_the_opt_out(
    machine_without_seccomp_and_landlock: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    path = flowrun_file(tmp_path, allow_weak_isolation=False)
    monkeypatch.setattr(sys, "argv", ["flowlane", "run", str(path), "--run-dir", str(run_dir)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: this machine lacks sandbox layers the agent's code must run under: landlock, seccomp; "
        "set spec.sandbox.allowWeakIsolation: true in the FlowRun to run without them\n")
    assert not run_dir.exists()  # nothing was started


def test_allow_weak_isolation_skips_the_check(machine_without_seccomp_and_landlock: None, tmp_path: Path) -> None:
    run_command.check_sandbox_layers(load_flowrun(flowrun_file(tmp_path, allow_weak_isolation=True)))


def test_a_failing_probe_is_reported_as_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def probe(*args: object) -> tuple[IsolationLayer, ...]:
        raise RuntimeError("sandbox probe failed: error: sandbox setup failed: no /proc")

    monkeypatch.setattr(runner, "probe_isolation", probe)
    with pytest.raises(ConfigError, match="the code sandbox cannot run on this machine: sandbox probe failed"):
        run_command.check_sandbox_layers(load_flowrun(flowrun_file(tmp_path, allow_weak_isolation=False)))


def test_this_machine_has_every_mandatory_layer(tmp_path: Path) -> None:
    run_command.check_sandbox_layers(load_flowrun(flowrun_file(tmp_path, allow_weak_isolation=False)))
