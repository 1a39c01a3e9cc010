"""``flowlane run``: a FlowRun on this machine, as supervised local processes.

The FlowRun file is the same one ``kubectl apply`` takes. It is validated, compiled into the
process graph the operator also renders (learner, rollout workers, sandboxes) and placed by the
local backend on loopback ports. While it runs, a progress display polls the learner's status RPC
(step, reward, held-out accuracy, ETA) and shows component restarts as they happen. Ctrl-C stops
the run after the learner has written a checkpoint; ``--resume`` continues from it. Embedded
defaults: ``file://`` checkpoints and a sqlite MLflow store under the run directory.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import typer

DEFAULT_RUNS_DIR = Path("runs")


def prepare_run_dir(flowrun: Any, run_dir: Path, *, resume: bool, restart: bool) -> Path:
    """Create the run directory; refuse to silently mix a new run into an old one's checkpoints."""
    from flowlane.api.errors import ConfigError

    checkpoints = run_dir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
    if has_checkpoints and not resume:
        if not restart:
            raise ConfigError(
                f"{run_dir} already holds checkpoints of run {flowrun.name!r}; pass --resume to continue "
                "from the latest one or --restart to start over (the old run directory is moved aside)"
            )
        moved = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), moved)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


#: Learner memory per weight byte: policy + reference copy + gradients + two AdamW moments.
LEARNER_BYTES_PER_WEIGHT_BYTE = 5
#: Rollout engine memory per weight byte (weights + activations), plus its fixed KV cache.
ROLLOUT_BYTES_PER_WEIGHT_BYTE = 1.5
KV_CACHE_BYTES = 1 << 30


def check_fits(flowrun: Any, available_bytes: int | None = None) -> None:
    """Refuse a run whose planner cannot fit this machine's memory, before starting anything."""
    import psutil

    from flowlane.api.errors import ConfigError
    from flowlane.kit.models import resolve_model

    spec = flowrun.spec

    def weights_of(model: str) -> int:
        return sum(p.stat().st_size for p in resolve_model(model).glob("*.safetensors"))

    weight_bytes = weights_of(spec.model.planner)
    engine_bytes = weight_bytes * ROLLOUT_BYTES_PER_WEIGHT_BYTE + KV_CACHE_BYTES
    if spec.model.fixed:  # a second, frozen engine in every rollout worker
        engine_bytes += weights_of(spec.model.fixed) * ROLLOUT_BYTES_PER_WEIGHT_BYTE + KV_CACHE_BYTES
    learner_factor = 2 if spec.model.lora.enabled else LEARNER_BYTES_PER_WEIGHT_BYTE
    needed = int(weight_bytes * learner_factor + spec.rollout.replicas * engine_bytes)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if needed > available:
        raise ConfigError(
            f"spec.model.planner: {spec.model.planner} ({weight_bytes / 2**30:.1f} GiB of weights) needs about "
            f"{needed / 2**30:.1f} GiB for the learner and {spec.rollout.replicas} rollout worker(s), but this "
            f"machine has {available / 2**30:.1f} GiB available; enable spec.model.lora, lower "
            "spec.rollout.replicas, or use a smaller planner"
        )


def check_sandbox_layers(flowrun: Any) -> None:
    """Refuse, before anything starts, a run whose sandbox components would refuse to start here
    (a mandatory layer missing from this kernel) and would otherwise fail in a restart loop."""
    from flowlane.api.errors import ConfigError
    from flowlane.runtime.sandbox import runner
    from flowlane.runtime.sandbox.layers import IsolationLayer, missing_mandatory_layers

    if flowrun.spec.sandbox.allow_weak_isolation:
        return  # the sandbox logs what it runs without
    try:
        layers = asyncio.run(runner.probe_isolation())
    except RuntimeError as exc:
        raise ConfigError(f"the code sandbox cannot run on this machine: {exc}") from None
    # The sandbox server makes itself non-dumpable first thing; this process does not.
    missing = missing_mandatory_layers((*layers, IsolationLayer.NON_DUMPABLE_CALLER))
    if missing:
        raise ConfigError(
            f"this machine lacks sandbox layers the agent's code must run under: {', '.join(missing)}; "
            "set spec.sandbox.allowWeakIsolation: true in the FlowRun to run without them")


async def _status(address: str, token: str) -> Any | None:
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import open_channel

    try:
        async with open_channel(address, token) as channel:
            stub = learner_pb2_grpc.LearnerStub(channel)
            return await asyncio.wait_for(stub.GetStatus(learner_pb2.StatusRequest()), 2.0)
    except Exception:
        return None


def _bar_info(status: Any) -> str:
    info = f"reward {status.reward_mean:.2f}"
    if status.HasField("baseline_accuracy"):
        info += f" | held-out base {status.baseline_accuracy:.2f}"
    if status.HasField("held_out_accuracy"):
        info += f" now {status.held_out_accuracy:.2f}"
    elif status.HasField("validation_accuracy"):
        info += f" | validation {status.validation_accuracy:.2f}"
    if status.message:
        info += f" | {status.message}"
    return info


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(status: Any, total_steps: int, elapsed_s: float) -> str:
    """One log line for a learner status: step, mean reward, the latest validation accuracy, elapsed
    and ETA (and the test accuracy once training is over).

    The ETA extrapolates the mean time per finished step; before the first step it is unknown.
    """
    step = status.step
    accuracy = f"{status.validation_accuracy:.3f}" if status.HasField("validation_accuracy") else "-"
    eta = _clock(elapsed_s / step * max(total_steps - step, 0)) if step > 0 else "-"
    line = (f"step {step}/{total_steps} reward {status.reward_mean:.3f} validation {accuracy} "
            f"elapsed {_clock(elapsed_s)} eta {eta}")
    if status.HasField("held_out_accuracy"):
        line += f" test {status.held_out_accuracy:.3f}"
    return f"{line} | {status.message}" if status.message else line


async def drive(flowrun: Any, run_dir: Path, *, quiet: bool = False) -> tuple[str, Any | None]:
    """Start the graph, show progress until it ends, return (outcome, last learner status)."""
    import yaml
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from flowlane.kit.cpus import ENV_COLOCATED_RANKS
    from flowlane.kit.grpc_common import generate_token
    from flowlane.operator.graph import compile_graph
    from flowlane.operator.local import LocalSupervisor
    from flowlane.operator.local_status import EventKind, RestartPolicy, SupervisorEvent

    config_path = run_dir / "run.yaml"
    graph = compile_graph(flowrun, config_path=str(config_path.resolve()))
    config_path.write_text(yaml.safe_dump(graph.config, sort_keys=False))
    token = generate_token()
    console = Console(quiet=quiet)

    def on_event(event: SupervisorEvent) -> None:
        if event.kind in (EventKind.RESTARTING, EventKind.FAILED):
            console.print(f"[yellow]{event.component}[/]: {event.kind.value} {event.message}")
        elif event.kind is EventKind.EXITED and event.exit_code not in (0, None):
            console.print(f"[red]{event.component}[/] exited with {event.exit_code}; "
                          f"log: {run_dir / 'logs' / (event.component + '.log')}")

    policy = RestartPolicy(restart_limit=max(flowrun.spec.backoff_limit, 1), stop_grace_s=60.0,
                           ready_timeout_s=600.0)
    learner = flowrun.spec.learner
    common_env = {"FLOWLANE_RUN_DIR": str(run_dir.resolve()),
                  # Every learner pod runs on this machine: their ranks share its CPUs.
                  ENV_COLOCATED_RANKS: str(learner.replicas * learner.ranks_per_replica)}
    supervisor = LocalSupervisor.for_graph(graph, run_dir, policy, token=token, on_event=on_event,
                                           common_env=common_env)
    console.print(f"flowrun [bold]{flowrun.name}[/]: {len(graph.components)} components, "
                  f"{flowrun.spec.schedule.steps} steps; logs in {run_dir / 'logs'}")
    await supervisor.start()
    supervisor.install_signal_handlers()
    learner_address = supervisor.address(graph.lead_learner, "grpc")
    last: Any | None = None
    waiter = asyncio.create_task(supervisor.wait())
    if console.is_terminal:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("training", total=flowrun.spec.schedule.steps, info="starting")
            while not waiter.done():
                status = await _status(learner_address, token)
                if status is not None:
                    last = status
                    progress.update(bar, completed=status.step, info=_bar_info(status))
                await asyncio.wait({waiter}, timeout=1.0)
    else:
        # Redirected (CI, nohup, a pod's log): rich would draw its bar only at the end, so print
        # one plain line per step instead.
        started, printed = time.monotonic(), -1
        while not waiter.done():
            status = await _status(learner_address, token)
            if status is not None:
                last = status
                if status.step != printed:
                    printed = status.step
                    console.print(progress_line(status, flowrun.spec.schedule.steps, time.monotonic() - started),
                                  markup=False, highlight=False)
            await asyncio.wait({waiter}, timeout=1.0)
    outcome = waiter.result()
    return outcome.value, last


def run(
    config: Path = typer.Argument(..., help="A FlowRun YAML file (the same one kubectl apply takes).",
                                  exists=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the run dir."),
    restart: bool = typer.Option(False, "--restart", help="Start over; an existing run dir is moved aside."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Where state goes (default: runs/<name>)."),
) -> None:
    """Run a FlowRun on this machine with embedded defaults (file checkpoints, local MLflow)."""
    from flowlane.api.errors import ConfigError
    from flowlane.api.flowrun import load_flowrun

    if not config.is_file():
        raise ConfigError(f"{config}: no such FlowRun file")
    flowrun = load_flowrun(config)
    check_fits(flowrun)
    check_sandbox_layers(flowrun)
    directory = prepare_run_dir(flowrun, run_dir or DEFAULT_RUNS_DIR / flowrun.name, resume=resume,
                                restart=restart)
    outcome, status = asyncio.run(drive(flowrun, directory))
    typer.echo(summary(flowrun, directory, outcome, status))
    if outcome != "completed":
        raise typer.Exit(1 if outcome == "failed" else 130)


def summary(flowrun: Any, run_dir: Path, outcome: str, status: Any | None) -> str:
    lines = [f"flowrun {flowrun.name}: {outcome}"]
    if status is not None:
        lines.append(f"  steps {status.step}/{status.total_steps}, last reward {status.reward_mean:.3f}")
        if status.HasField("baseline_accuracy") or status.HasField("held_out_accuracy"):
            base = f"{status.baseline_accuracy:.3f}" if status.HasField("baseline_accuracy") else "-"
            now = f"{status.held_out_accuracy:.3f}" if status.HasField("held_out_accuracy") else "-"
            lines.append(f"  held-out accuracy: untrained {base} -> trained {now}")
        if status.last_checkpoint:
            lines.append(f"  last checkpoint: {status.last_checkpoint}")
        if status.best_checkpoint and status.HasField("best_validation_accuracy"):
            lines.append(f"  best checkpoint (validation {status.best_validation_accuracy:.3f}): "
                         f"{status.best_checkpoint}")
    if outcome != "completed":
        lines.append(f"  continue with: flowlane run {run_dir / 'run.yaml'} --resume --run-dir {run_dir}")
    tracking = flowrun.spec.tracking.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    lines.append(f"  compare runs in MLflow: mlflow ui --backend-store-uri {tracking}")
    return "\n".join(lines)
