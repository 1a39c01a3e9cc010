"""FlowRun benchmark: does training help, where does a step's time go, and how fast do weights move.

Four parts, each selectable with ``--only`` (default: all):

- ``learning``: ``flowlane run`` on a FlowRun file (default ``examples/flowrun.yaml``) to the end,
  in a fresh temporary run directory, as a user would run it. Reported from the run's MLflow store:
  held-out accuracy of the untrained planner (``test/baseline_accuracy``) vs the trained one (the
  last ``test/accuracy``), the paired gain's 95% interval, and the wall-clock time of the whole
  command. Target on the 2-core machine: at least +10 points within 30 minutes, with the interval
  above zero.
- ``breakdown`` (comes with every FlowRun this script runs): per-step seconds from the learner's
  MLflow metrics: ``time/rollout_s`` (the learner waiting for the step's trajectories, which
  includes the workers pulling and loading the previous step's weights), ``time/learn_s`` (the
  Flow-GRPO update), ``time/publish_s`` (exporting the new weights for the stream) and
  ``time/step_s``; plus the rollout workers' own weight-sync lines from their logs ("loaded
  policy version N (X MB in Y s, Z MB/s)": stream + load into the running vLLM engine).
- ``async``: the same short FlowRun twice, ``maxStaleness: 0`` (on-policy: rollout waits for the
  new weights) and ``maxStaleness: 1`` (rollout of step k+1 overlaps the update of step k).
  Steady-state steps/s = (steps - 1) / (time the last step was logged - time the first step was
  logged), from MLflow timestamps, so engine start-up and the baseline evaluation do not count.
- ``sync``: weight-stream throughput. A learner-shaped gRPC server in a child process (the real
  generated ``Learner`` service with only ``GetWeights`` implemented exactly as the learner does
  it, behind the real token interceptor and server options) streams the bundled model's weights
  (float32, ~540 MB) with ``iter_weight_chunks``; this process pulls them with the real channel
  and ``assemble_weights_async``, like a rollout worker. Next to it, the same bytes sent over a
  plain loopback TCP socket pair between the same two processes: the ceiling of the transport.

Run ``.venv/bin/python bench/flowrun.py [--only sync,async,learning] [--config FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "flowrun.yaml"
LEARNING_TARGET_POINTS = 10.0
LEARNING_TARGET_S = 30 * 60
PARTS = ("sync", "async", "learning")
ISAS = ("native", "avx2")
ISA_NOTE = ("ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, torch.cpu's AVX-512/AMX checks answer no, so "
            "vLLM loads its AVX2 kernels; the core, caches and memory stay this machine's")


def isa_env(isa: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment that makes the Python processes of a run take ``isa``'s code paths."""
    if isa == "native":
        return {}
    hook = str(Path(__file__).resolve().parent / f"isa_{isa}")
    path = environ.get("PYTHONPATH", "")
    return {"ATEN_CPU_CAPABILITY": isa, "ONEDNN_MAX_CPU_ISA": isa.upper(),
            "PYTHONPATH": hook + (os.pathsep + path if path else "")}


# --- running a FlowRun and reading what it logged ----------------------------------------------


@dataclass
class FlowRunResult:
    label: str
    run_dir: Path
    returncode: int
    wall_s: float
    output: str
    metrics: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # key -> (step, t_s, value)
    worker_syncs: list[tuple[int, float, float]] = field(default_factory=list)  # (version, MB, s)

    def values(self, key: str) -> list[float]:
        return [value for _, _, value in self.metrics.get(key, [])]

    def last(self, key: str) -> float | None:
        values = self.values(key)
        return values[-1] if values else None

    @property
    def steps_per_s(self) -> float | None:
        """Steady-state step rate: from the first step's metrics to the last step's."""
        points = sorted(self.metrics.get("time/step_s", []))
        if len(points) < 2:
            return None
        return (len(points) - 1) / max(points[-1][1] - points[0][1], 1e-9)


def run_flowrun(label: str, config: Path, run_dir: Path, timeout_s: float) -> FlowRunResult:
    """``flowlane run config --run-dir run_dir`` to the end (SIGINT to its group on timeout)."""
    command = [sys.executable, "-m", "flowlane.cli", "run", str(config), "--run-dir", str(run_dir)]
    print(f"[{label}] {' '.join(command[2:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "160"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"[{label}] still running after {timeout_s:.0f} s: stopping it (SIGINT)", flush=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    wall = time.monotonic() - started
    result = FlowRunResult(label, run_dir, proc.returncode, wall, output)
    result.metrics = read_mlflow_metrics(run_dir, config)
    if not result.metrics:
        print(f"[{label}] no metrics in the run's MLflow store (see {run_dir}/mlflow-offline.jsonl if the "
              "tracker fell back to it; pass --keep to keep run directories)", flush=True)
    result.worker_syncs = read_worker_syncs(run_dir)
    tail = [line for line in output.splitlines() if line.strip()][-6:]
    print(f"[{label}] exit {proc.returncode} after {wall:.0f} s; " + " | ".join(s.strip() for s in tail), flush=True)
    return result


def read_mlflow_metrics(run_dir: Path, config: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every metric history of the newest MLflow run of the FlowRun's experiment."""
    from flowlane.api.flowrun import load_flowrun

    tracking = load_flowrun(config).spec.tracking
    uri = tracking.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}
    run = runs[0]
    metrics: dict[str, list[tuple[int, float, float]]] = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        metrics[key] = sorted((m.step, m.timestamp / 1000.0, m.value) for m in history)
    return metrics


def read_worker_syncs(run_dir: Path) -> list[tuple[int, float, float]]:
    """(version, MB, seconds) of every policy version the rollout workers loaded."""
    from flowlane.runtime.rollout.worker import SYNC_LOG_PATTERN

    syncs = []
    for log in sorted((run_dir / "logs").glob("rollout*.log")):
        for match in SYNC_LOG_PATTERN.finditer(log.read_text(errors="replace")):
            syncs.append((int(match.group(1)), float(match.group(3)), float(match.group(4))))
    return syncs


def breakdown_rows(results: list[FlowRunResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        step = r.values("time/step_s")
        if not step:
            continue
        row: dict[str, Any] = {"run": r.label, "steps": len(step)}
        for key, name in (("time/rollout_s", "rollout s"), ("time/learn_s", "learn s"),
                          ("time/publish_s", "publish s"), ("time/step_s", "step s")):
            values = r.values(key)
            row[name] = statistics.median(values) if values else None
        total = row["step s"] or float("nan")
        row["rollout / learn / publish %"] = "/".join(
            f"{100 * (row[k] or 0) / total:.0f}" for k in ("rollout s", "learn s", "publish s"))
        later = [s for s in r.worker_syncs if s[0] > 0]
        row["worker sync s"] = statistics.median(s[2] for s in later) if later else None
        row["worker sync MB/s"] = statistics.median(s[1] / s[2] for s in later if s[2] > 0) if later else None
        rows.append(row)
    return rows


def _pair(first: float | None, second: float | None, digits: int = 2) -> str:
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in (first, second))


def tiny_flowrun(name: str, steps: int, max_staleness: int, group_size: int, questions: int) -> dict[str, Any]:
    """A short FlowRun that still exercises every component (1 planner turn, python tool)."""
    return {
        "apiVersion": "flowlane.dev/v1alpha1",
        "kind": "FlowRun",
        "metadata": {"name": name},
        "spec": {
            "tools": [{"name": "python"}],
            "tasks": {"dataset": "arithmetic"},
            "algorithm": {"groupSize": group_size, "batchQuestions": questions, "maxTurns": 1,
                          "maxPlannerTokens": 96, "lr": 1e-5, "skipUniformGroups": False},
            "schedule": {"steps": steps, "checkpointInterval": steps, "evalInterval": 0, "evalLimit": 2,
                         "evalMaxTurns": 1},
            "maxStaleness": max_staleness,
        },
    }


# --- parts -------------------------------------------------------------------------------------


def check_runnable(config: Path) -> str | None:
    """Why ``config`` cannot run (an invalid file, a task set that does not load), or None.

    Checked here because ``flowlane run`` would only find out inside the learner process, after
    starting every component and retrying it ``backoffLimit`` times.
    """
    from flowlane.api.errors import FlowlaneError
    from flowlane.api.flowrun import load_flowrun
    from flowlane.kit.tasks import load_tasks

    try:
        spec = load_flowrun(config).spec
        load_tasks(spec.tasks.dataset, spec.tasks.split)
        load_tasks(spec.schedule.eval_tasks or spec.tasks.dataset, spec.schedule.eval_split)
    except FlowlaneError as err:
        return str(err)
    return None


def part_learning(args: argparse.Namespace, workdir: Path) -> list[FlowRunResult]:
    config = Path(args.config).resolve()
    problem = check_runnable(config)
    if problem is not None:
        print(f"\n### Learning result ({config.name})\n\nnot run: {config}: {problem}")
        return []
    result = run_flowrun("learning", config, workdir / "learning", args.learning_timeout_s)
    base, final = result.last("test/baseline_accuracy"), result.last("test/accuracy")
    gain = None if base is None or final is None else 100 * (final - base)
    steps = len(result.values("time/step_s"))
    low, high = result.last("test/gain_ci_low"), result.last("test/gain_ci_high")
    # A pass needs the gain, the time, and a paired interval that excludes no gain at all: +12 points
    # on 8 questions (interval -10 to +35) is not a result.
    ok = (gain is not None and gain >= LEARNING_TARGET_POINTS and result.wall_s <= LEARNING_TARGET_S
          and low is not None and low > 0)
    fixed, broken = result.last("test/gain_fixed"), result.last("test/gain_broken")
    evals = result.values("test/time_s")
    target = f"target +{LEARNING_TARGET_POINTS:g} pts in {LEARNING_TARGET_S // 60} min"
    row = {
        "run": config.name, "exit": result.returncode, "steps": steps,
        "held-out untrained": base, "held-out trained": final, "gain (points)": gain,
        "gain 95% CI (points)": None if low is None or high is None else f"{100 * low:+.0f} to {100 * high:+.0f}",
        "fixed / broken": None if fixed is None or broken is None else f"{fixed:.0f} / {broken:.0f}",
        "McNemar p": result.last("test/gain_p_value"),
        "planner turns untrained / trained": _pair(result.last("test/baseline_turns_per_trajectory"),
                                                  result.last("test/turns_per_trajectory")),
        "test eval s untrained / trained": _pair(evals[0] if evals else None, evals[1] if len(evals) > 1 else None,
                                                digits=0),
        "wall clock s": result.wall_s, target: "PASS" if ok else "FAIL",
    }
    print(f"\n### Learning result ({config.name})\n")
    print(common.markdown_table([row], list(row), digits=3))
    print("\nThe gain is paired: the same test questions before and after training. Its interval is the "
          "Wald interval of a difference of paired proportions; McNemar's exact test asks whether the "
          "questions fixed outnumber those broken by more than chance.")
    if result.returncode != 0:
        print("\nthe run did not complete; its last output lines:\n")
        print("\n".join("    " + line for line in result.output.splitlines()[-15:]))
    return [result]


def part_async(args: argparse.Namespace, workdir: Path) -> list[FlowRunResult]:
    import yaml

    results = []
    for staleness in (0, 1):
        name = f"bench-async-s{staleness}"
        config = workdir / f"{name}.yaml"
        spec = tiny_flowrun(name, args.async_steps, staleness, args.async_group_size, args.async_questions)
        config.write_text(yaml.safe_dump(spec, sort_keys=False))
        results.append(run_flowrun(f"maxStaleness {staleness}", config, workdir / name, args.async_timeout_s))
    rows = []
    for r in results:
        rows.append({"run": r.label, "exit": r.returncode, "steps": len(r.values("time/step_s")),
                     "steps/s": r.steps_per_s, "s/step": 1 / r.steps_per_s if r.steps_per_s else None,
                     "whole command s": r.wall_s})
    s0, s1 = results[0].steps_per_s, results[1].steps_per_s
    print(f"\n### Async speedup (groupSize {args.async_group_size}, batchQuestions {args.async_questions}, "
          f"{args.async_steps} steps, 1 planner turn)\n")
    print(common.markdown_table(rows, ["run", "exit", "steps", "steps/s", "s/step", "whole command s"], digits=3))
    if s0 and s1:
        print(f"\nspeedup maxStaleness 1 vs 0: {s1 / s0:.2f}x (steady-state steps/s)")
    return results


def _serve_weights(model_dir: str, token: str, port_queue: Any, stop_event: Any) -> None:
    """Child process: a Learner gRPC server whose GetWeights streams the model like the learner does."""
    from safetensors.torch import load_file

    from flowlane.api import learner_pb2_grpc
    from flowlane.kit.grpc_common import DEFAULT_WEIGHT_CHUNK_BYTES, bind_port, create_server, iter_weight_chunks

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    cached = [(name, t.float().contiguous()) for name, t in tensors.items()]

    class WeightsOnly(learner_pb2_grpc.LearnerServicer):
        async def GetWeights(self, request: Any, context: Any) -> Any:
            for chunk in iter_weight_chunks(cached, 1, request.chunk_bytes or DEFAULT_WEIGHT_CHUNK_BYTES):
                yield chunk

    async def serve() -> None:
        server = create_server(token)
        learner_pb2_grpc.add_LearnerServicer_to_server(WeightsOnly(), server)
        port = bind_port(server, "127.0.0.1", 0)
        await server.start()
        port_queue.put(port)
        while not stop_event.is_set():
            await asyncio.sleep(0.1)
        await server.stop(grace=None)

    asyncio.run(serve())


def _send_raw(model_dir: str, port: int) -> None:
    """Child process: the same weight bytes over a plain TCP socket (sendall per tensor)."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    views = [memoryview(t.float().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
             for t in tensors.values()]
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(sum(len(v) for v in views).to_bytes(8, "little"))
        for view in views:
            conn.sendall(view)


def part_sync(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import assemble_weights_async, generate_token, open_channel
    from flowlane.kit.models import resolve_model

    model_dir = str(resolve_model(args.model))
    ctx = multiprocessing.get_context("spawn")
    token = generate_token()
    ports: Any = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=_serve_weights, args=(model_dir, token, ports, stop), daemon=True)
    server.start()
    grpc_times: list[float] = []
    nbytes = 0
    tensors_count = 0
    try:
        port = ports.get(timeout=180)

        async def pull() -> tuple[float, int, int]:
            async with open_channel(f"127.0.0.1:{port}", token) as channel:
                stub = learner_pb2_grpc.LearnerStub(channel)
                started = time.perf_counter()
                _, tensors = await assemble_weights_async(
                    stub.GetWeights(learner_pb2.WeightsRequest(min_version=1, chunk_bytes=args.chunk_mb << 20)))
                took = time.perf_counter() - started
                return took, sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors)

        for i in range(args.sync_repeats + 1):  # the first pull warms up both ends
            took, nbytes, tensors_count = asyncio.run(pull())
            if i > 0:
                grpc_times.append(took)
    finally:
        stop.set()
        server.join(timeout=30)
        if server.is_alive():
            server.kill()

    raw_times: list[float] = []
    raw_bytes = 0
    for i in range(args.sync_repeats + 1):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            sender = ctx.Process(target=_send_raw, args=(model_dir, listener.getsockname()[1]), daemon=True)
            sender.start()
            try:
                listener.settimeout(180)
                raw_bytes, took = _timed_receive(listener)
            finally:
                sender.join(timeout=60)
                if sender.is_alive():
                    sender.kill()
        if i > 0:
            raw_times.append(took)

    rows = [
        {"transport": f"gRPC weight stream (GetWeights, {args.chunk_mb} MiB chunks, token auth)",
         "MB": nbytes / 1e6, "tensors": tensors_count, "median s": statistics.median(grpc_times),
         "MB/s (median)": nbytes / 1e6 / statistics.median(grpc_times),
         "MB/s (best)": nbytes / 1e6 / min(grpc_times)},
        {"transport": "plain loopback TCP socket (same bytes)", "MB": raw_bytes / 1e6, "tensors": tensors_count,
         "median s": statistics.median(raw_times), "MB/s (median)": raw_bytes / 1e6 / statistics.median(raw_times),
         "MB/s (best)": raw_bytes / 1e6 / min(raw_times)},
    ]
    ratio = statistics.median(raw_times) / statistics.median(grpc_times) * nbytes / max(raw_bytes, 1)
    print(f"\n### Weight-sync throughput ({Path(model_dir).name}, float32; {args.sync_repeats} timed pulls each "
          "after one warm-up; server and client in separate processes)\n")
    print(common.markdown_table(rows, ["transport", "MB", "tensors", "median s", "MB/s (median)", "MB/s (best)"],
                                digits=1))
    print(f"\ngRPC stream reaches {ratio:.0%} of plain socket throughput. The stream's time includes "
          "serialising chunks on the server and reassembling the tensors on the client; loading into a "
          "running vLLM engine comes on top (see the worker sync column of the breakdown).")
    return rows


def _timed_receive(listener: socket.socket) -> tuple[int, float]:
    """Accept the sender and time the transfer from after its 8-byte length header to the last byte
    (the sender loads the model before it connects, so loading is not transport time)."""
    conn, _ = listener.accept()
    with conn:
        header = b""
        while len(header) < 8:
            header += conn.recv(8 - len(header))
        started = time.perf_counter()
        total = int.from_bytes(header, "little")
        buffer = bytearray(total)
        view = memoryview(buffer)
        received = 0
        while received < total:
            n = conn.recv_into(view[received:], min(total - received, 1 << 22))
            if n == 0:
                raise ConnectionError(f"the sender closed after {received} of {total} bytes")
            received += n
        return received, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run: {', '.join(PARTS)} (the step-time breakdown "
                             "comes with async and learning)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="FlowRun file for the learning part")
    parser.add_argument("--learning-timeout-s", type=float, default=45 * 60)
    parser.add_argument("--async-steps", type=int, default=4, help="steps of each async-speedup run")
    parser.add_argument("--async-group-size", type=int, default=2)
    parser.add_argument("--async-questions", type=int, default=2, help="questions per step in the async runs")
    parser.add_argument("--async-timeout-s", type=float, default=15 * 60, help="limit for each async run")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model whose weights the sync part streams")
    parser.add_argument("--sync-repeats", type=int, default=3, help="timed transfers per transport")
    parser.add_argument("--chunk-mb", type=int, default=4, help="gRPC weight chunk size in MiB")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    parser.add_argument("--isa", choices=ISAS, default="native",
                        help="avx2: the runs' processes take the code paths of an x86 CPU without AVX-512 "
                             "(torch, oneDNN and vLLM kernels; see bench/isa_avx2/sitecustomize.py)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if args.async_steps < 2:
        parser.error("--async-steps must be >= 2 (the step rate needs two logged steps)")

    notes = [f"parts: {', '.join(parts)}"]
    if args.isa != "native":
        os.environ.update(isa_env(args.isa, os.environ))  # every process the parts start inherits it
        notes.append(f"instruction set: {args.isa} code paths forced on this CPU ({ISA_NOTE})")
    common.print_header("flowlane FlowRun benchmark", notes)
    workdir = Path(tempfile.mkdtemp(prefix="flowlane-bench-"))
    runs: list[FlowRunResult] = []
    try:
        if "sync" in parts:
            part_sync(args)
        if "async" in parts:
            runs += part_async(args, workdir)
        if "learning" in parts:
            runs += part_learning(args, workdir)
        rows = breakdown_rows(runs)
        if rows:
            print("\n### Step-time breakdown (median seconds per step, from MLflow; worker sync from the "
                  "rollout logs)\n")
            print(common.markdown_table(rows, list(rows[0]), digits=2))
    finally:
        if args.keep:
            print(f"\nrun directories kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n- load average at end (1, 5, 15 min): {common.load_average()}")


if __name__ == "__main__":  # the sync part spawns child processes: the guard is required
    main()
