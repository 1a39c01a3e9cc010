"""The local backend supervises real processes like a kubelet: order, restarts, clean stops."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from flowlane.api.common import Resources
from flowlane.api.flowrun import load_flowrun
from flowlane.operator.graph import Component, Port, Protocol, Role, SecretEnv, compile_graph
from flowlane.operator.local import LocalSupervisor
from flowlane.operator.local_plan import PortInUseError, StartupError, dependency_levels, local_argv, render
from flowlane.operator.local_status import ComponentState, EventKind, RestartPolicy, RunOutcome
from flowlane.runtime.sandbox.server import RemoteCodeRunner

PY = sys.executable

# Listens on argv[1] after argv[2] seconds, answers "hello" to each connection, runs until killed.
SERVER = textwrap.dedent("""
    import socket, sys, time
    time.sleep(float(sys.argv[2]))
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
    print("listening", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
""")
# Connects to host:port argv[1] once: exit 0 if the server answered, 1 otherwise.
CLIENT = textwrap.dedent("""
    import socket, sys
    host, port = sys.argv[1].split(":")
    try:
        print("got", socket.create_connection((host, int(port)), timeout=2).recv(5).decode(), flush=True)
    except OSError as err:
        print("no server:", err, flush=True); sys.exit(1)
""")
# Starts a grandchild (a long sleep), optionally ignores SIGTERM, then idles.
PARENT_WITH_CHILD = textwrap.dedent("""
    import signal, subprocess, sys, time
    if sys.argv[1] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("started", flush=True)
    time.sleep(300)
""")
CRASH = "import sys; print('crashing', flush=True); sys.exit(3)"
IDLE = "import time; time.sleep(300)"


def fast_policy(restart_limit: int = 3, backoff_initial_s: float = 0.2, stop_grace_s: float = 2.0,
                ready_timeout_s: float = 20.0) -> RestartPolicy:
    return RestartPolicy(restart_limit=restart_limit, backoff_initial_s=backoff_initial_s, backoff_max_s=5.0,
                         reset_after_s=60.0, stop_grace_s=stop_grace_s, ready_timeout_s=ready_timeout_s)


def component(name: str, *argv: str, ports: tuple[Port, ...] = (), depends_on: tuple[str, ...] = (),
              ready_port: str | None = None, service: bool = False,
              secret_env: dict[str, SecretEnv] | None = None) -> Component:
    """A graph component running ``python -c ...`` (what compile_graph makes, minus the model)."""
    return Component(name=name, role=Role.SANDBOX if service else Role.LEARNER, index=0, argv=(PY, "-c", *argv),
                     env={}, secret_env=secret_env or {}, ports=ports, resources=Resources(),
                     depends_on=depends_on, ready_port=ready_port, service=service)


def descendants(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc)
        except psutil.NoSuchProcess:
            pass
    return living


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def kinds(supervisor: LocalSupervisor, name: str) -> list[EventKind]:
    return [e.kind for e in supervisor.events if e.component == name]


# --- pure helpers ---


FLOWRUN = """
apiVersion: flowlane.dev/v1alpha1
kind: FlowRun
metadata: {name: tiny}
spec:
  rollout: {replicas: 2}
  sandbox: {replicas: 2}
"""


def test_dependency_levels_of_a_compiled_graph_start_servers_before_workers() -> None:
    graph = compile_graph(load_flowrun(FLOWRUN))

    assert dependency_levels(graph.components) == [["learner", "sandbox-0", "sandbox-1"],
                                                   ["rollout-0", "rollout-1"]]


def test_dependency_cycle_is_refused_naming_the_components() -> None:
    components = [component("a", "", depends_on=("b",)), component("b", "", depends_on=("a",))]
    with pytest.raises(StartupError, match="dependency cycle among components: a, b"):
        dependency_levels(components)


def test_render_fills_the_graph_placeholders_with_loopback_values() -> None:
    ports = {"learner": {"grpc": 50123}}
    assert render("--learner={address:learner.grpc}", ports) == "--learner=127.0.0.1:50123"
    assert render("{port:learner.grpc}", ports) == "50123"
    assert render('{"json": {"stays": 1}}', ports) == '{"json": {"stays": 1}}'
    with pytest.raises(StartupError, match="names port 'http' of component 'learner', which the graph does not"):
        render("{port:learner.http}", ports)


def test_flowlane_commands_run_with_this_interpreter() -> None:
    assert local_argv(("flowlane", "sandbox", "--port", "1")) == [PY, "-m", "flowlane.cli", "sandbox", "--port", "1"]
    assert local_argv((PY, "-c", "pass")) == [PY, "-c", "pass"]
    assert local_argv(("torchrun", "--standalone", "-m", "flowlane.cli")) == [
        PY, "-m", "torch.distributed.run", "--standalone", "-m", "flowlane.cli"]


def test_a_learner_of_several_ranks_runs_its_command_under_torchrun() -> None:
    header = "apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo}\n"
    one = compile_graph(load_flowrun(header)).component("learner")
    two = compile_graph(load_flowrun(header + "spec: {learner: {ranks: 2}}")).component("learner")
    assert two.argv == ("torchrun", "--standalone", "--nproc-per-node=2", "--max-restarts=0", "-m", "flowlane.cli",
                        *one.argv[1:])
    gpus = compile_graph(load_flowrun(header + "spec: {learner: {resources: {gpu: 4}}}")).component("learner")
    assert gpus.argv[:3] == ("torchrun", "--standalone", "--nproc-per-node=4")


# --- real processes ---


async def test_dependents_start_only_after_the_dependency_is_ready(tmp_path: Path) -> None:
    components = [
        component("server", SERVER, "{port:server.main}", "0.5", ports=(Port("main", 9000, Protocol.HTTP),),
                  ready_port="main", service=True),
        component("client", CLIENT, "{address:server.main}", depends_on=("server",)),
    ]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy())
    await supervisor.start()
    outcome = await asyncio.wait_for(supervisor.wait(), 30)

    assert outcome is RunOutcome.COMPLETED
    order = [(e.component, e.kind) for e in supervisor.events if e.kind in (EventKind.READY, EventKind.STARTED)]
    assert order.index(("server", EventKind.READY)) < order.index(("client", EventKind.STARTED))
    assert supervisor.status["client"].restarts == 0
    assert "got hello" in (tmp_path / "logs" / "client.log").read_text()
    assert supervisor.status["server"].state is ComponentState.STOPPED


async def kill_and_wait_for_restart(supervisor: LocalSupervisor, name: str) -> float:
    """SIGKILL the component's process; seconds until its replacement is ready."""
    status = supervisor.status[name]
    old_pid = status.pid
    assert old_pid is not None
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    await wait_for(lambda: status.pid != old_pid and status.state is ComponentState.READY)
    return time.monotonic() - killed_at


async def test_sigkilled_component_is_restarted_with_exponential_backoff(tmp_path: Path) -> None:
    components = [component("sandbox", IDLE, service=True)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(backoff_initial_s=0.3))
    await supervisor.start()
    try:
        first = await kill_and_wait_for_restart(supervisor, "sandbox")
        second = await kill_and_wait_for_restart(supervisor, "sandbox")
    finally:
        await supervisor.stop()

    assert first >= 0.3 and second >= 0.6
    restarting = [e for e in supervisor.events if e.kind is EventKind.RESTARTING]
    assert [(e.exit_code, e.delay_s, e.restarts) for e in restarting] == [(-signal.SIGKILL, 0.3, 1),
                                                                          (-signal.SIGKILL, 0.6, 2)]
    assert supervisor.status["sandbox"].restarts == 2


async def test_a_group_member_that_crashes_takes_the_other_members_down_and_all_start_again(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    crash_once = (f"import pathlib, sys, time; m = pathlib.Path({str(marker)!r})\n"
                  "if not m.exists(): time.sleep(0.5); m.touch(); sys.exit(3)\ntime.sleep(300)")
    components = [dataclasses.replace(component("learner-0", IDLE), group="learner"),
                  dataclasses.replace(component("learner-1", crash_once), group="learner"),
                  component("sandbox", IDLE, service=True)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(backoff_initial_s=0.1))
    await supervisor.start()
    try:
        await wait_for(lambda: kinds(supervisor, "learner-0").count(EventKind.STARTED) == 2
                       and kinds(supervisor, "learner-1").count(EventKind.STARTED) == 2)
    finally:
        await supervisor.stop()

    exits = [(e.component, e.exit_code) for e in supervisor.events if e.kind is EventKind.EXITED]
    assert exits[:2] == [("learner-1", 3), ("learner-0", -signal.SIGKILL)]
    assert (supervisor.status["learner-0"].restarts, supervisor.status["learner-1"].restarts) == (1, 1)
    assert kinds(supervisor, "sandbox").count(EventKind.STARTED) == 1  # not in the group


async def test_restart_limit_fails_the_run_naming_the_component_and_its_log(tmp_path: Path) -> None:
    components = [component("learner", CRASH), component("sandbox", IDLE, service=True)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(restart_limit=2, backoff_initial_s=0.05))
    await supervisor.start()
    outcome = await asyncio.wait_for(supervisor.wait(), 30)

    assert outcome is RunOutcome.FAILED
    assert kinds(supervisor, "learner").count(EventKind.STARTED) == 3
    assert supervisor.status["learner"].state is ComponentState.FAILED
    assert supervisor.status["learner"].restarts == 2
    assert supervisor.failure == (f"component 'learner' exited with code 3 after 2 restarts (limit 2); "
                                  f"see {tmp_path / 'logs' / 'learner.log'}")
    assert (tmp_path / "logs" / "learner.log").read_text().count("crashing") == 3
    assert supervisor.status["sandbox"].state is ComponentState.STOPPED


async def test_stop_terminates_process_groups_and_leaves_no_orphans(tmp_path: Path) -> None:
    components = [component("polite", PARENT_WITH_CHILD, "default", service=True),
                  component("stubborn", PARENT_WITH_CHILD, "ignore-term", service=True)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(stop_grace_s=0.5))
    await supervisor.start()
    pids = [s.pid for s in supervisor.status.values() if s.pid is not None]
    await wait_for(lambda: len(descendants(pids)) == 4)  # two components, each with a grandchild
    procs = descendants(pids)

    await asyncio.wait_for(supervisor.stop(), 10)

    assert alive(procs) == []
    assert supervisor.status["polite"].last_exit_code == -signal.SIGTERM
    assert supervisor.status["stubborn"].last_exit_code == -signal.SIGKILL


async def test_stop_signals_no_group_of_a_component_that_exited_before(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that completed had its group killed when it exited; by the time the run stops, its
    pid may lead another process's group (pids wrap), so stopping must not signal it again."""
    import flowlane.operator.local as local

    signalled: list[int] = []

    def recording(pgid: int, sig: signal.Signals) -> bool:
        signalled.append(pgid)
        return signal_group(pgid, sig)

    signal_group = local.signal_group
    monkeypatch.setattr(local, "signal_group", recording)
    components = [component("job", "pass"), component("sandbox", IDLE, service=True)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy())
    await supervisor.start()
    await wait_for(lambda: supervisor.status["job"].state is ComponentState.COMPLETED)
    job_pid = supervisor.status["job"].pid
    assert signalled == [job_pid]  # at its exit, for anything it left in its group
    await asyncio.wait_for(supervisor.stop(), 10)

    assert signalled.count(job_pid) == 1
    assert supervisor.status["sandbox"].pid in signalled


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from flowlane.api.common import Resources
    from flowlane.operator.graph import Component, Role
    from flowlane.operator.local import LocalSupervisor
    CHILD = sys.argv[2]

    async def main():
        supervisor = LocalSupervisor(
            [Component(f"c{i}", Role.SANDBOX, i, (sys.executable, "-c", CHILD, "default"), {}, {}, (), Resources(),
                       service=True) for i in range(2)], Path(sys.argv[1]))
        supervisor.install_signal_handlers()
        await supervisor.start()
        print(json.dumps([s.pid for s in supervisor.status.values()]), flush=True)
        outcome = await supervisor.wait()
        print(json.dumps([outcome, *(s.last_exit_code for s in supervisor.status.values())]), flush=True)

    asyncio.run(main())
""")


def start_supervisor_process(run_dir: Path) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    """SUPERVISOR_SCRIPT running two components with a grandchild each; returns it and those 4 processes."""
    supervisor = subprocess.Popen([PY, "-c", SUPERVISOR_SCRIPT, str(run_dir), PARENT_WITH_CHILD],
                                  stdout=subprocess.PIPE, text=True)
    assert supervisor.stdout is not None
    pids = json.loads(supervisor.stdout.readline())
    deadline = time.monotonic() + 10
    while len(descendants(pids)) < 4:
        assert time.monotonic() < deadline, "components did not start their children"
        time.sleep(0.05)
    return supervisor, descendants(pids)


def test_killing_the_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    supervisor, procs = start_supervisor_process(tmp_path)
    supervisor.kill()
    supervisor.wait()

    deadline = time.monotonic() + 10
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(procs) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_supervisor_stops_components_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    supervisor, procs = start_supervisor_process(tmp_path)
    supervisor.send_signal(sig)
    out, _ = supervisor.communicate(timeout=20)

    assert supervisor.returncode == 0
    assert json.loads(out) == ["stopped", -signal.SIGTERM, -signal.SIGTERM]  # SIGTERM, not the SIGKILL fallback
    assert alive(procs) == []


async def test_requested_port_in_use_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        components = [component("learner", IDLE, ports=(Port("grpc", 50051),))]
        supervisor = LocalSupervisor(components, tmp_path, fast_policy(), port_overrides={"learner": {"grpc": port}})
        with pytest.raises(PortInUseError) as caught:
            await supervisor.start()

    assert str(caught.value) == (f"component 'learner' port 'grpc': 127.0.0.1:{port} is already in use; "
                                 "stop the process holding it or request another port (0 picks a free one)")
    assert supervisor.events == []


async def test_component_never_ready_fails_the_start_and_stops_what_started(tmp_path: Path) -> None:
    components = [component("sandbox", IDLE, service=True),
                  component("learner", IDLE, ports=(Port("grpc", 50051),), ready_port="grpc")]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(ready_timeout_s=1.5))
    with pytest.raises(StartupError, match=r"component 'learner' was not ready on port 'grpc' \(127.0.0.1:\d+\) "
                                           r"within 1.5s; see .*learner.log"):
        await supervisor.start()
    pids = [s.pid for s in supervisor.status.values() if s.pid is not None]
    assert len(pids) == 2
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []


async def test_missing_secret_is_named_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWLANE_TOOL_WEB_KEY", raising=False)
    components = [component("rollout-0", IDLE, secret_env={"FLOWLANE_TOOL_WEB_KEY": SecretEnv("web", "key")})]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy())
    with pytest.raises(StartupError) as caught:
        await supervisor.start()

    assert str(caught.value) == ("component 'rollout-0' needs FLOWLANE_TOOL_WEB_KEY (Secret 'web', key 'key' on "
                                 "Kubernetes): set FLOWLANE_TOOL_WEB_KEY in the environment for a local run")
    assert supervisor.events == []


async def test_components_never_inherit_a_torch_distributed_rendezvous(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A MASTER_PORT in the caller's environment (a shell under torchrun, a process that ran
    DeepSpeed) is a port already taken: a learner that inherited it could not start its group."""
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "60201"), ("RANK", "3"),
                        ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3"), ("FLOWLANE_TEST_KEPT", "yes")):
        monkeypatch.setenv(name, value)
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in sorted(os.environ)}))"
    supervisor = LocalSupervisor([component("learner", show)], tmp_path, fast_policy())
    await supervisor.start()
    assert await asyncio.wait_for(supervisor.wait(), 30) is RunOutcome.COMPLETED

    seen = json.loads((tmp_path / "logs" / "learner.log").read_text().splitlines()[-1])
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(seen)
    assert seen["FLOWLANE_TEST_KEPT"] == "yes"


async def test_graph_token_is_generated_and_shared_by_every_component(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWLANE_GRPC_TOKEN", raising=False)
    graph = compile_graph(load_flowrun(FLOWRUN))
    print_token = "import os; print(os.environ['FLOWLANE_GRPC_TOKEN'])"
    graph = dataclasses.replace(graph, components=tuple(
        dataclasses.replace(c, argv=(PY, "-c", print_token), ready_port=None, service=False, depends_on=())
        for c in graph.components))
    supervisor = LocalSupervisor.for_graph(graph, tmp_path, fast_policy())
    await supervisor.start()
    assert await asyncio.wait_for(supervisor.wait(), 30) is RunOutcome.COMPLETED

    tokens = {(tmp_path / "logs" / f"{c.name}.log").read_text().splitlines()[-1] for c in graph.components}
    assert len(tokens) == 1 and len(tokens.pop()) >= 32


async def test_compiled_sandboxes_serve_grpc_and_come_back_after_kill_9(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWLANE_GRPC_TOKEN", raising=False)
    config = tmp_path / "run.yaml"
    graph = compile_graph(load_flowrun(FLOWRUN), config_path=str(config))
    config.write_text(yaml.safe_dump(graph.config))
    sandboxes = dataclasses.replace(graph, components=tuple(graph.by_role(Role.SANDBOX)))  # the real commands
    supervisor = LocalSupervisor.for_graph(sandboxes, tmp_path, fast_policy(backoff_initial_s=0.1), token="t0ken")
    await supervisor.start()
    client = RemoteCodeRunner(supervisor.address("sandbox-1", "grpc"), "t0ken", connect_timeout_s=10)
    try:
        before = await client.run("print(6 * 7)")
        os.kill(supervisor.status["sandbox-1"].pid or 0, signal.SIGKILL)
        await wait_for(lambda: supervisor.status["sandbox-1"].restarts == 1, timeout_s=20)
        after = await client.run("print(6 * 7)")
    finally:
        await client.close()
        await supervisor.stop()

    assert (before.stdout, after.stdout) == ("42\n", "42\n")
    assert [e.kind for e in supervisor.events if e.component == "sandbox-1"][:4] == [
        EventKind.STARTED, EventKind.READY, EventKind.EXITED, EventKind.RESTARTING]
