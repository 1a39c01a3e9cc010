"""The local backend supervises real processes like a kubelet: order, restarts, clean stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from flowlane.operator.local import (
    ComponentState,
    EventKind,
    LocalComponent,
    LocalSupervisor,
    PortInUseError,
    Readiness,
    ReadinessKind,
    RestartMode,
    RestartPolicy,
    RunOutcome,
    StartupError,
    dependency_levels,
    render,
)

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


def fast_policy(**overrides: float) -> RestartPolicy:
    values = {"restart_limit": 3, "backoff_initial_s": 0.2, "backoff_max_s": 5.0, "reset_after_s": 60.0,
              "stop_grace_s": 2.0, **overrides}
    return RestartPolicy(**values)  # type: ignore[arg-type]


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


async def wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def kinds(supervisor: LocalSupervisor, name: str) -> list[EventKind]:
    return [e.kind for e in supervisor.events if e.component == name]


# --- pure helpers ---


def test_dependency_levels_order_components_after_their_dependencies() -> None:
    components = [LocalComponent("rollout", ["x"], depends_on=["learner", "sandbox"]),
                  LocalComponent("learner", ["x"]), LocalComponent("sandbox", ["x"])]
    assert dependency_levels(components) == [["learner", "sandbox"], ["rollout"]]


def test_dependency_cycle_is_refused_naming_the_components() -> None:
    components = [LocalComponent("a", ["x"], depends_on=["b"]), LocalComponent("b", ["x"], depends_on=["a"])]
    with pytest.raises(StartupError, match="dependency cycle among components: a, b"):
        dependency_levels(components)


def test_render_replaces_port_and_address_placeholders_only() -> None:
    ports = {"learner": {"grpc": 50123}}
    assert render("--learner={address:learner.grpc}", ports) == "--learner=127.0.0.1:50123"
    assert render("{port:learner.grpc}", ports) == "50123"
    assert render('{"json": {"stays": 1}}', ports) == '{"json": {"stays": 1}}'
    with pytest.raises(StartupError, match="component 'learner' has no port 'http'"):
        render("{port:learner.http}", ports)


# --- real processes ---


async def test_dependents_start_only_after_the_dependency_is_ready(tmp_path: Path) -> None:
    components = [
        LocalComponent("server", [PY, "-c", SERVER, "{port:server.main}", "0.5"], ports={"main": 0},
                       readiness=Readiness(ReadinessKind.TCP, "main", timeout_s=20), restart=RestartMode.ALWAYS),
        LocalComponent("client", [PY, "-c", CLIENT, "{address:server.main}"], depends_on=["server"]),
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


async def test_sigkilled_component_is_restarted_with_exponential_backoff(tmp_path: Path) -> None:
    components = [LocalComponent("sandbox", [PY, "-c", IDLE], restart=RestartMode.ALWAYS)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(backoff_initial_s=0.3))
    await supervisor.start()
    try:
        status = supervisor.status["sandbox"]
        for expected_restarts, expected_delay in ((1, 0.3), (2, 0.6)):
            old_pid = status.pid
            assert old_pid is not None
            killed_at = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            await wait_for(lambda old=old_pid: status.pid != old and status.state is ComponentState.READY)
            assert time.monotonic() - killed_at >= expected_delay
            assert status.restarts == expected_restarts
            restarting = [e for e in supervisor.events if e.kind is EventKind.RESTARTING][-1]
            assert (restarting.exit_code, restarting.delay_s) == (-signal.SIGKILL, expected_delay)
    finally:
        await supervisor.stop()


async def test_restart_limit_fails_the_run_naming_the_component_and_its_log(tmp_path: Path) -> None:
    components = [LocalComponent("learner", [PY, "-c", CRASH]),
                  LocalComponent("sandbox", [PY, "-c", IDLE], restart=RestartMode.ALWAYS)]
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
    components = [LocalComponent("polite", [PY, "-c", PARENT_WITH_CHILD, "default"], restart=RestartMode.ALWAYS),
                  LocalComponent("stubborn", [PY, "-c", PARENT_WITH_CHILD, "ignore-term"], restart=RestartMode.ALWAYS)]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy(stop_grace_s=0.5))
    await supervisor.start()
    pids = [s.pid for s in supervisor.status.values() if s.pid is not None]
    await wait_for(lambda: len(descendants(pids)) == 4)  # two components, each with a grandchild
    procs = descendants(pids)

    await asyncio.wait_for(supervisor.stop(), 10)

    assert alive(procs) == []
    assert supervisor.status["polite"].last_exit_code == -signal.SIGTERM
    assert supervisor.status["stubborn"].last_exit_code == -signal.SIGKILL


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from flowlane.operator.local import LocalComponent, LocalSupervisor, RestartMode
    CHILD = sys.argv[2]

    async def main():
        supervisor = LocalSupervisor(
            [LocalComponent(f"c{i}", [sys.executable, "-c", CHILD, "default"], restart=RestartMode.ALWAYS)
             for i in range(2)], Path(sys.argv[1]))
        await supervisor.start()
        print(json.dumps([s.pid for s in supervisor.status.values()]), flush=True)
        await supervisor.wait()

    asyncio.run(main())
""")


def test_killing_the_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    supervisor = subprocess.Popen([PY, "-c", SUPERVISOR_SCRIPT, str(tmp_path), PARENT_WITH_CHILD],
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert supervisor.stdout is not None
        pids = json.loads(supervisor.stdout.readline())
        deadline = time.monotonic() + 10
        while len(descendants(pids)) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs = descendants(pids)
    finally:
        supervisor.kill()
        supervisor.wait()

    deadline = time.monotonic() + 10
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(procs) == []


async def test_requested_port_in_use_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        components = [LocalComponent("learner", [PY, "-c", IDLE], ports={"grpc": port})]
        supervisor = LocalSupervisor(components, tmp_path, fast_policy())
        with pytest.raises(PortInUseError) as caught:
            await supervisor.start()

    assert str(caught.value) == (f"component 'learner' port 'grpc': 127.0.0.1:{port} is already in use; "
                                 "stop the process holding it or request another port (0 picks a free one)")
    assert supervisor.events == []


async def test_component_never_ready_fails_the_start_and_stops_what_started(tmp_path: Path) -> None:
    components = [
        LocalComponent("sandbox", [PY, "-c", IDLE], restart=RestartMode.ALWAYS),
        LocalComponent("learner", [PY, "-c", IDLE], ports={"grpc": 0},
                       readiness=Readiness(ReadinessKind.TCP, "grpc", timeout_s=0.5)),
    ]
    supervisor = LocalSupervisor(components, tmp_path, fast_policy())
    with pytest.raises(StartupError, match=r"component 'learner' was not ready on port 'grpc' within 0.5s"):
        await supervisor.start()
    pids = [s.pid for s in supervisor.status.values() if s.pid is not None]
    assert len(pids) == 2
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []
