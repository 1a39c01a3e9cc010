"""A FlowRun end to end: real processes, real gRPC, the bundled model on vLLM, real faults.

One short run with two learner pods (``learner.replicas: 2``, one torchrun node of one rank each,
ZeRO stage 2) is driven through ``flowlane run`` while the test kills its components with
SIGKILL: a rollout worker mid-step, the sandbox, and the second learner pod right after a
checkpoint (which restarts both pods as a group). The run must still complete with every step
built from exactly one trajectory per unit, both pods must resume from the checkpoint, whose
manifest holds both ranks' state, weights must reach the rollout worker, and metrics must reach
MLflow. A second invocation with ``--resume`` and more steps continues from the last checkpoint.
The behaviours are asserted in separate tests over the shared runs (starting vLLM and DeepSpeed
costs a minute per process on two cores, so one run serves them all).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# The console script, as users run it (`python -m` would put the cwd, the repo root, on sys.path).
FLOWLANE = [str(Path(sys.executable).parent / "flowlane")]
GROUP_SIZE = 2
QUESTIONS = 2
STEPS = 3
LEARNER_PODS = ("learner-0", "learner-1")


def flowrun_yaml(name: str, steps: int) -> dict:
    return {
        "apiVersion": "flowlane.dev/v1alpha1",
        "kind": "FlowRun",
        "metadata": {"name": name},
        "spec": {
            "tools": [{"name": "python"}],
            "tasks": {"dataset": "arithmetic"},
            "algorithm": {"groupSize": GROUP_SIZE, "batchQuestions": QUESTIONS, "maxTurns": 1,
                          "maxPlannerTokens": 96, "lr": 1e-4,
                          # Every step updates the policy, even when a group's rewards are equal.
                          "skipUniformGroups": False},
            "schedule": {"steps": steps, "checkpointInterval": 2, "evalInterval": 0, "evalLimit": 2,
                         "evalMaxTurns": 1},
            "backoffLimit": 3,
        },
    }


def two_pod_flowrun(name: str, steps: int) -> dict:
    """``flowrun_yaml`` with the learner as two pods of one rank each, ZeRO stage 2."""
    document = flowrun_yaml(name, steps)
    document["spec"]["learner"] = {"replicas": len(LEARNER_PODS), "ranks": 1}
    document["spec"]["engine"] = {"zeroStage": 2}
    return document


@dataclass
class RunRecord:
    run_dir: Path
    returncode: int = -1
    output: str = ""
    killed: dict[str, int] = field(default_factory=dict)  # component -> pid killed
    # Where this invocation's output starts in the output file (a resumed run appends to it).
    output_offset: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        out = output_file(self.run_dir)
        self.output_offset = out.stat().st_size if out.exists() else 0

    def log(self, component: str) -> str:
        return (self.run_dir / "logs" / f"{component}.log").read_text(errors="replace")


def component_pid(run_dir: Path, role: str, *marks: str) -> int | None:
    """The pid of the run's ``role`` process whose command line also holds every one of ``marks``."""
    config = str((run_dir / "run.yaml").resolve())
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if config in cmd and role in cmd and all(mark in cmd for mark in marks):
            return int(proc.info["pid"])
    return None


def wait_for(predicate, timeout_s: float, what: str, run_dir: Path | None = None,
             proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            output = output_file(run_dir).read_text(errors="replace") if run_dir else ""
            raise AssertionError(f"`flowlane run` exited ({proc.returncode}) before {what}:\n"
                                 f"{output[-4000:]}\n{situation(run_dir)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{situation(run_dir)}")


def situation(run_dir: Path | None, lines: int = 15) -> str:
    """What a timeout needs to be understood: the machine's load, its busiest processes, and the
    last lines of every component log."""
    parts = [f"load average {os.getloadavg()}"]
    procs = sorted(psutil.process_iter(["pid", "username", "cpu_times", "cmdline"]),
                   key=lambda p: -sum((p.info["cpu_times"] or (0, 0))[:2]))
    for proc in procs[:8]:
        cpu = sum((proc.info["cpu_times"] or (0, 0))[:2])
        parts.append(f"  {proc.info['pid']} {proc.info['username']} {cpu:.0f}s cpu: "
                     f"{' '.join(proc.info['cmdline'] or [])[:160]}")
    for log in sorted((run_dir / "logs").glob("*.log")) if run_dir else []:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def learner_log_has(run_dir: Path, pattern: str, learner: str = "learner") -> bool:
    path = run_dir / "logs" / f"{learner}.log"
    return path.exists() and re.search(pattern, path.read_text(errors="replace")) is not None


def start(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    """``flowlane run`` with its output going to a file beside the run directory: a pipe that
    nobody reads until the end would block the supervisor once 64 KiB of output pile up."""
    env = {**os.environ, "COLUMNS": "200"}
    out = output_file(run_dir)
    with out.open("a") as sink:
        return subprocess.Popen([*FLOWLANE, "run", str(config), "--run-dir", str(run_dir), *extra],
                                stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)


def output_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.out"


def finish(proc: subprocess.Popen[str], record: RunRecord, timeout_s: float) -> None:
    """Wait for the run; ``record.output`` is what this invocation printed."""
    out = output_file(record.run_dir)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    with out.open("rb") as f:
        f.seek(record.output_offset)
        record.output = f.read().decode(errors="replace")
    record.returncode = proc.returncode


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[RunRecord]:
    """A 3-step run whose rollout worker, sandbox and second learner pod are each killed with SIGKILL once."""
    base = tmp_path_factory.mktemp("flowrun")
    config = base / "flowrun.yaml"
    config.write_text(yaml.safe_dump(two_pod_flowrun("chaos", STEPS)))
    record = RunRecord(base / "run")
    proc = start(config, record.run_dir)
    try:
        run_dir = record.run_dir
        wait_for(lambda: learner_log_has(run_dir, r"step 1/3", "learner-0"), 900, "the first step", run_dir, proc)
        for role in ("rollout", "sandbox"):
            pid = component_pid(run_dir, role)
            assert pid is not None, f"no {role} process found"
            os.kill(pid, signal.SIGKILL)
            record.killed[role] = pid
        wait_for(lambda: learner_log_has(run_dir, r"checkpoint \S+step-00000002 written", "learner-0"), 900,
                 "the step-2 checkpoint", run_dir, proc)
        pid = component_pid(run_dir, "learner", "--node-rank=1")  # learner-1's torchrun node
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        record.killed["learner-1"] = pid
        finish(proc, record, 1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    yield record


@pytest.fixture(scope="module")
def resumed_run(chaos_run: RunRecord) -> RunRecord:
    """The chaos run continued with --resume and one more step."""
    assert chaos_run.returncode == 0, chaos_run.output[-3000:]
    config = chaos_run.run_dir.parent / "flowrun-more.yaml"
    config.write_text(yaml.safe_dump(two_pod_flowrun("chaos", STEPS + 1)))
    record = RunRecord(chaos_run.run_dir)
    finish(start(config, record.run_dir, "--resume"), record, 900)
    return record


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "MANIFEST.json").is_file())


def test_the_run_completes_despite_killed_components(chaos_run: RunRecord) -> None:
    assert chaos_run.returncode == 0, chaos_run.output[-3000:]
    assert set(chaos_run.killed) == {"rollout", "sandbox", "learner-1"}
    assert f"steps {STEPS}/{STEPS}" in chaos_run.output
    assert "4 components" in chaos_run.output  # learner-0, learner-1, sandbox-0, rollout-0


def test_killed_components_are_restarted_and_a_learner_pod_takes_its_group_down(chaos_run: RunRecord) -> None:
    # learner-0 was not killed: it went down with learner-1, and both started again.
    for component in ("rollout-0", "sandbox-0", *LEARNER_PODS):
        assert f"{component}: restarting" in chaos_run.output, chaos_run.output[-3000:]
        assert "--- flowlane: start 2 of" in chaos_run.log(component)


def test_both_learner_pods_resume_from_the_last_checkpoint(chaos_run: RunRecord) -> None:
    log = chaos_run.log("learner-0")
    assert re.search(r"resumed from step-00000002 \(step 2, policy version 2\)", log), log[-3000:]
    assert "step 3/3" in log
    assert checkpoint_steps(chaos_run.run_dir)[-1] == STEPS
    # The last step's checkpoint is written once, after the final evaluation.
    assert len(re.findall(rf"checkpoint \S+step-{STEPS:08d} written", log)) == 1, log[-3000:]
    # learner-1 follows rank 0 to the end: at least a step and a checkpoint per step.
    assert follower_calls(chaos_run.log("learner-1")) >= 2


def follower_calls(log: str) -> int:
    """How many of rank 0's calls learner-1 made in its last start (a load, steps, checkpoints)."""
    return int(log.rsplit("rank 0 ended the run after ", 1)[1].split()[0])


def test_the_checkpoint_holds_both_learner_pods_state(chaos_run: RunRecord) -> None:
    step = chaos_run.run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((step / "learner_state.json").read_text())["world_size"] == 2
    listed = {f["path"] for f in json.loads((step / "MANIFEST.json").read_text())["files"]}
    assert "deepspeed/rng_state_rank1.pt" in listed
    shards = sorted(Path(p).name for p in listed if p.endswith("optim_states.pt"))
    assert [name.split("zero_pp_rank_")[1].split("_")[0] for name in shards] == ["0", "1"], shards


def test_new_weights_reach_the_rollout_worker(chaos_run: RunRecord) -> None:
    versions = [int(v) for v in re.findall(r"loaded policy version (\d+)", chaos_run.log("rollout-0"))]
    assert versions and max(versions) >= 2


def test_every_step_trains_on_exactly_one_trajectory_per_unit(chaos_run: RunRecord) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{chaos_run.run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = [m for r in runs for m in client.get_metric_history(r.info.run_id, "rollout/trajectories")]
    by_step = {m.step: m.value for m in history}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert set(by_step.values()) == {float(GROUP_SIZE * QUESTIONS)}


def test_metrics_and_trajectories_reach_mlflow(chaos_run: RunRecord) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{chaos_run.run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = {key for r in runs for key in r.data.metrics}
    assert {"loss", "test/baseline_accuracy", "time/rollout_s", "time/learn_s"} <= metrics
    # The learner was killed after step 2: the untrained round's per-question outcomes came back from
    # the checkpoint, and the final round is paired with them.
    final = {key: value for r in runs for key, value in r.data.metrics.items()}
    assert final["test/gain"] == pytest.approx(final["test/accuracy"] - final["test/baseline_accuracy"], abs=1e-9)
    assert final["test/gain_fixed"] - final["test/gain_broken"] == pytest.approx(2 * final["test/gain"], abs=1e-9)
    assert final["test/questions"] == 2.0 and final["test/accuracy_ci_low"] <= final["test/accuracy"]
    samples = [(r.info.run_id, a.path) for r in runs
               for a in client.list_artifacts(r.info.run_id, "trajectories") if a.path.endswith(".json")]
    assert samples
    run_id, path = samples[0]
    local = client.download_artifacts(run_id, path, str(chaos_run.run_dir / "artifacts"))
    trajectories = json.loads(Path(local).read_text())
    assert trajectories[0]["planner_turns"][0]["response_ids"]


def test_resume_continues_from_the_latest_checkpoint(resumed_run: RunRecord) -> None:
    assert resumed_run.returncode == 0, resumed_run.output[-3000:]
    log = resumed_run.log("learner-0")
    assert "resumed from step-00000003 (step 3, policy version 3)" in log, log[-3000:]
    # learner-1 loaded its own shards (a collective call from rank 0) and followed to the end.
    assert follower_calls(resumed_run.log("learner-1")) >= 2
    assert checkpoint_steps(resumed_run.run_dir)[-1] == STEPS + 1


# -- bad input: nothing is started ----------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOWLANE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_an_invalid_flowrun_names_every_bad_field(tmp_path: Path) -> None:
    bad = flowrun_yaml("bad", 2)
    bad["spec"]["rollout"] = {"replicas": 0}
    bad["spec"]["algorithm"]["groupSize"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = run_cli("run", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "spec.rollout.replicas" in result.stderr and "spec.algorithm.groupSize" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_dir_with_checkpoints_needs_resume_or_restart(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(flowrun_yaml("again", 2)))
    (tmp_path / "runs" / "again" / "checkpoints" / "step-00000001").mkdir(parents=True)
    result = run_cli("run", "f.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "--resume" in result.stderr and "--restart" in result.stderr


def test_a_model_that_does_not_fit_is_refused_before_anything_starts(tmp_path: Path, model_dir: Path) -> None:
    from flowlane.api.errors import ConfigError
    from flowlane.api.flowrun import load_flowrun
    from flowlane.operator.run_command import check_fits

    flowrun = load_flowrun(yaml.safe_dump(flowrun_yaml("big", 2)))
    with pytest.raises(ConfigError, match=r"spec.model.planner: .* needs about .* GiB .* enable spec.model.lora"):
        check_fits(flowrun, available_bytes=256 << 20)
    check_fits(flowrun, available_bytes=64 << 30)


def test_a_fixed_model_counts_as_a_second_engine_per_rollout_worker(model_dir: Path) -> None:
    from flowlane.api.errors import ConfigError
    from flowlane.api.flowrun import load_flowrun
    from flowlane.operator.run_command import check_fits

    shared = load_flowrun(yaml.safe_dump(flowrun_yaml("shared", 2)))
    document = flowrun_yaml("frozen", 2)
    document["spec"]["model"] = {"fixed": "smollm2-135m-instruct"}
    frozen = load_flowrun(yaml.safe_dump(document))
    # planner ~0.54 GB: learner 5x + one engine (1.5x + 1 GiB KV) ~ 4.5 GB; the fixed engine adds ~1.9 GB
    check_fits(shared, available_bytes=5_500 << 20)
    with pytest.raises(ConfigError, match="needs about"):
        check_fits(frozen, available_bytes=5_500 << 20)
    check_fits(frozen, available_bytes=7_000 << 20)


async def test_the_executor_verifier_and_generator_get_their_own_engine_only_when_fixed_is_set() -> None:
    from flowlane.runtime.engines.factory import close_engines, open_engines

    class Engine:
        def __init__(self, kind: str, model: str, **options: object) -> None:
            self.model, self.options, self.closed = model, options, False

        async def close(self) -> None:
            self.closed = True

    planner, fixed = await open_engines("vllm", "/models/run", None, create=Engine, seed=3)
    assert fixed is planner and (planner.model, planner.options) == ("/models/run", {"seed": 3})
    await close_engines(planner, fixed)
    assert planner.closed

    planner, fixed = await open_engines("vllm", "/models/run", "/models/base", create=Engine, seed=3)
    # Two vLLM engines take half the CPUs each (their threads compute side by side).
    assert fixed is not planner and (planner.model, fixed.model) == ("/models/run", "/models/base")
    assert (planner.options, fixed.options) == ({"seed": 3, "cpu_share": (0, 2)}, {"seed": 3, "cpu_share": (1, 2)})
    await close_engines(planner, fixed)
    assert planner.closed and fixed.closed

    planner, fixed = await open_engines("transformers", "/models/run", "/models/base", create=Engine, seed=3)
    assert (planner.options, fixed.options) == ({"seed": 3}, {"seed": 3})

    started: list[Engine] = []

    def failing(kind: str, model: str, **options: object) -> Engine:
        if model == "/models/base":
            raise RuntimeError("no such model")
        started.append(Engine(kind, model))
        return started[-1]

    with pytest.raises(RuntimeError, match="no such model"):
        await open_engines("vllm", "/models/run", "/models/base", create=failing)
    assert started and started[0].closed  # the planner's engine is not left running


@pytest.mark.parametrize(("kind", "dtype"), [("vllm", "auto"), ("vllm", "bfloat16"), ("transformers", "float32")])
def test_engine_options_from_the_spec_are_ones_the_engine_takes(kind: str, dtype: str) -> None:
    """Every option the rollout worker derives from a spec is a keyword of that engine's
    constructor (create_engine refuses anything else), and model.dtype reaches the engine."""
    import inspect

    from flowlane.api.flowrun import load_flowrun
    from flowlane.runtime.engines.factory import engine_class, parse_kind
    from flowlane.runtime.rollout.worker import engine_options

    document = flowrun_yaml("opts", 2)
    document["spec"]["engine"] = {"kind": kind}
    document["spec"]["model"] = {"dtype": dtype}
    options = engine_options(load_flowrun(yaml.safe_dump(document)).spec)
    parameters = inspect.signature(engine_class(parse_kind(kind)).__init__).parameters
    accepted = {n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(options) <= accepted, sorted(set(options) - accepted)
    assert options["dtype"] == dtype


def test_training_and_evaluation_units_get_the_specs_turn_budgets_and_floor() -> None:
    from flowlane.api.flowrun import load_flowrun
    from flowlane.runtime.rollout.worker import agent_configs

    document = flowrun_yaml("turns", 2)
    document["spec"]["algorithm"].update({"maxTurns": 4, "minTurns": 2, "temperature": 0.9})
    document["spec"]["schedule"]["evalMaxTurns"] = 6
    train, evaluation = agent_configs(load_flowrun(yaml.safe_dump(document)).spec)
    assert (train.min_turns, train.max_turns, train.planner.temperature) == (2, 4, 0.9)
    assert (evaluation.min_turns, evaluation.max_turns, evaluation.planner.temperature) == (2, 6, 0.0)
    assert train.planner.max_tokens == evaluation.planner.max_tokens == 96


def test_the_workers_weight_sync_log_line_reads_back() -> None:
    """bench/flowrun.py reads the workers' sync lines back with the pattern kept next to their format."""
    from flowlane.runtime.rollout.worker import SYNC_LOG_FORMAT, SYNC_LOG_PATTERN

    line = "2026-12-04 20:00:00,000 INFO flowlane.rollout: " + SYNC_LOG_FORMAT % (3, "LoRA adapter", 29.9, 0.41,
                                                                                72.9, 0.2)
    match = SYNC_LOG_PATTERN.search(line)
    assert match is not None and match.groups() == ("3", "LoRA adapter", "29.9", "0.41", "72.9", "0.20")


@pytest.mark.parametrize(("fixed", "fraction"), [(None, 0.8), ("smollm2-135m-instruct", 0.4)])
def test_on_a_gpu_the_fixed_engine_halves_each_engines_memory_fraction(
        fixed: str | None, fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from flowlane.api.flowrun import load_flowrun
    from flowlane.runtime.rollout.worker import engine_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    document = flowrun_yaml("gpu", 2)
    document["spec"]["engine"] = {"gpuMemoryUtilization": 0.8}
    document["spec"]["model"] = {"fixed": fixed} if fixed else {}
    options = engine_options(load_flowrun(yaml.safe_dump(document)).spec)
    assert options["engine_args"]["gpu_memory_utilization"] == pytest.approx(fraction)
    assert "kv_cache_gib" not in options
