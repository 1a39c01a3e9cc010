"""The Sandbox gRPC service runs code under limits, survives the code, and its client never raises."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from flowlane.api import sandbox_pb2
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxErrorKind
from flowlane.runtime.sandbox.server import DEFAULT_CEILING, RemoteCodeRunner, SandboxServicer, limits_from_proto

TOKEN = "sandbox-test-token"
MiB = 1024 * 1024


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


# The run config a FlowRun gives its sandboxes: its limits become the server's defaults.
RUN_CONFIG = """
apiVersion: flowlane.dev/v1alpha1
kind: FlowRun
metadata: {name: sandbox-test}
spec:
  sandbox: {limits: {wallTimeSeconds: 1.5, memoryMiB: 400}}
"""


def start_server(port: int = 0, max_concurrency: int = 2, config: Path | None = None) -> ServerProcess:
    """``python -m flowlane.runtime.sandbox.server`` as a real subprocess; waits for its ready line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLANE_GRPC_TOKEN")}
    env["FLOWLANE_GRPC_TOKEN"] = TOKEN
    process = subprocess.Popen(
        [sys.executable, "-m", "flowlane.runtime.sandbox.server", "--port", str(port),
         "--max-concurrency", str(max_concurrency), *(["--config", str(config)] if config else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.fullmatch(r"flowlane sandbox: serving on 127\.0\.0\.1:(\d+) \(max concurrency \d+\)\n", line)
    if match is None:
        process.kill()
        raise AssertionError(f"no ready line: {line!r} {process.stderr.read() if process.stderr else ''}")
    return ServerProcess(process, int(match.group(1)))


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait()


@pytest.fixture(scope="module")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("sandbox") / "run.yaml"
    config.write_text(RUN_CONFIG)
    server = start_server(max_concurrency=2, config=config)
    yield server
    stop_server(server)


@pytest.fixture
async def runner(sandbox_server: ServerProcess) -> AsyncIterator[RemoteCodeRunner]:
    client = RemoteCodeRunner(sandbox_server.address, TOKEN, limits=SandboxLimits())  # 10 s, not the config's
    yield client
    await client.close()


async def test_code_runs_over_grpc_and_returns_its_output(runner: RemoteCodeRunner) -> None:
    result = await runner.run("print(6 * 7)\nimport sys; print('warn', file=sys.stderr)")

    assert (result.ok, result.stdout, result.stderr, result.exit_code, result.error_kind) == (
        True, "42\n", "warn\n", 0, None)
    assert result.duration_s > 0
    assert result.isolation  # the layers in force travel back with the result


async def test_wall_clock_limit_is_reported_as_timeout(runner: RemoteCodeRunner) -> None:
    result = await runner.run("while True:\n    pass", SandboxLimits(wall_time_s=1.0, cpu_time_s=30.0))

    assert (result.ok, result.error_kind, result.message) == (
        False, SandboxErrorKind.TIMEOUT, "timeout: wall-clock limit of 1s")


async def test_runs_without_limits_get_the_run_configs_sandbox_limits(sandbox_server: ServerProcess) -> None:
    client = RemoteCodeRunner(sandbox_server.address, TOKEN)
    try:
        timed_out = await client.run("while True:\n    pass")
        out_of_memory = await client.run("x = bytearray(600 * 1024 * 1024)")
    finally:
        await client.close()

    assert timed_out.message == "timeout: wall-clock limit of 1.5s"
    assert out_of_memory.message == "memory_limit: memory limit of 400 MiB"


async def test_memory_limit_is_reported(runner: RemoteCodeRunner) -> None:
    result = await runner.run("x = bytearray(600 * 1024 * 1024)", SandboxLimits(memory_bytes=300 * MiB))

    assert (result.ok, result.error_kind, result.message) == (
        False, SandboxErrorKind.MEMORY_LIMIT, "memory_limit: memory limit of 300 MiB")


async def test_output_over_the_limit_is_truncated(runner: RemoteCodeRunner) -> None:
    result = await runner.run("print('x' * 100_000)", SandboxLimits(max_output_bytes=1000))

    assert (result.ok, result.truncated, result.stdout) == (True, True, "x" * 1000)


async def test_server_survives_code_that_kills_itself_or_its_parent(
    runner: RemoteCodeRunner, sandbox_server: ServerProcess
) -> None:
    suicide = await runner.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    parricide = await runner.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    after = await runner.run("print('still here')")

    assert (suicide.error_kind, suicide.exit_code) == (SandboxErrorKind.KILLED, -signal.SIGKILL)
    assert parricide.ok is False
    assert after.stdout == "still here\n"
    assert sandbox_server.process.poll() is None


async def test_concurrent_runs_are_bounded_by_max_concurrency(runner: RemoteCodeRunner) -> None:
    code = "import time\nstart = time.time()\ntime.sleep(0.5)\nprint(start, time.time())"
    results = await asyncio.gather(*(runner.run(code) for _ in range(4)))
    spans = [tuple(map(float, r.stdout.split())) for r in results]

    def overlap_at(t: float) -> int:
        return sum(start <= t < end for start, end in spans)

    assert max(overlap_at(start) for start, _ in spans) == 2  # the server runs 2 at a time, never more


async def test_health_reports_serving_and_capacity(runner: RemoteCodeRunner) -> None:
    reply = await runner.health()

    assert (reply.serving, reply.active, reply.max_concurrency) == (True, 0, 2)


def test_zero_limits_take_the_server_defaults() -> None:
    defaults = SandboxLimits(wall_time_s=7.0, memory_bytes=123 * MiB)
    limits = limits_from_proto(sandbox_pb2.ExecuteLimits(cpu_time_s=2.0), defaults)

    assert limits == SandboxLimits(cpu_time_s=2.0, wall_time_s=7.0, memory_bytes=123 * MiB)


def test_limits_above_the_ceiling_are_capped() -> None:
    request = sandbox_pb2.ExecuteLimits(wall_time_s=10_000.0, memory_bytes=1 << 40, max_processes=10_000)
    limits = limits_from_proto(request, SandboxLimits())

    assert (limits.wall_time_s, limits.memory_bytes, limits.max_processes) == (
        DEFAULT_CEILING.wall_time_s, DEFAULT_CEILING.memory_bytes, DEFAULT_CEILING.max_processes)


async def code_processes_of(server: ServerProcess, timeout_s: float = 10.0) -> list[psutil.Process]:
    """The processes running code for ``server``, once the code itself runs (set-up done: the process
    dropped root and sleeps in the code's ``time.sleep``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        children = psutil.Process(server.process.pid).children(recursive=True)
        with contextlib.suppress(psutil.NoSuchProcess):
            if children and all(c.uids().real != 0 and c.status() == psutil.STATUS_SLEEPING for c in children):
                return children
        assert time.monotonic() < deadline, "the server never started the code"
        await asyncio.sleep(0.05)


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


async def test_killed_server_gives_a_tool_error_and_a_restarted_one_serves_again() -> None:
    server = start_server(max_concurrency=1)
    client = RemoteCodeRunner(server.address, TOKEN)  # waits up to 3 s: above the 2 s reconnect back-off
    orphans: list[psutil.Process] = []
    try:
        assert (await client.run("print(1)")).ok
        in_flight = asyncio.create_task(client.run("import time\ntime.sleep(30)"))
        orphans = await code_processes_of(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        killed_mid_run = await asyncio.wait_for(in_flight, 15)
        while_down = await client.run("print(2)")

        server = start_server(port=server.port, max_concurrency=1)
        after_restart = await client.run("print(3)")
    finally:
        await client.close()
        stop_server(server)
        kill_all(orphans)

    for result in (killed_mid_run, while_down):
        assert (result.ok, result.error_kind, result.exit_code) == (False, SandboxErrorKind.ERROR, None)
        assert result.message.startswith(f"error: sandbox server at {server.address} unreachable "
                                         "(down or restarting): UNAVAILABLE")
    assert after_restart.stdout == "3\n", after_restart


async def test_code_in_flight_dies_with_a_killed_server() -> None:
    server = start_server(max_concurrency=1)
    client = RemoteCodeRunner(server.address, TOKEN)
    code_processes: list[psutil.Process] = []
    try:
        in_flight = asyncio.create_task(client.run("import time\ntime.sleep(60)"))
        code_processes = await code_processes_of(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        await asyncio.wait_for(in_flight, 15)
        _, alive = psutil.wait_procs(code_processes, timeout=3)
    finally:
        await client.close()
        stop_server(server)
        kill_all(code_processes)

    assert alive == []


async def test_wrong_token_gives_a_tool_error_naming_the_token(sandbox_server: ServerProcess) -> None:
    client = RemoteCodeRunner(sandbox_server.address, "not-the-token")
    try:
        result = await client.run("print(1)")
    finally:
        await client.close()

    assert result.ok is False
    assert result.message == (f"error: sandbox server at {sandbox_server.address} refused the token "
                              "(check FLOWLANE_GRPC_TOKEN): UNAUTHENTICATED (invalid token)")


def test_sigterm_stops_the_server_gracefully() -> None:
    server = start_server()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=15)
    finally:
        stop_server(server)

    assert code == 0
    assert server.process.stdout is not None
    assert server.process.stdout.read() == "flowlane sandbox: stopping\n"


def test_server_without_a_token_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLANE_GRPC_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "flowlane.runtime.sandbox.server", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=30)

    assert done.returncode == 2
    assert done.stderr == ("error: no gRPC token: set FLOWLANE_GRPC_TOKEN (or FLOWLANE_GRPC_TOKEN_FILE to a file "
                           "holding it); clients must send the same token\n")


async def test_nothing_listening_gives_a_tool_error_after_the_connect_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # closed again: nothing listens there
    client = RemoteCodeRunner(address, TOKEN, connect_timeout_s=0.5)
    try:
        result = await client.run("print(1)")
    finally:
        await client.close()

    assert (result.ok, result.error_kind, result.exit_code) == (False, SandboxErrorKind.ERROR, None)
    assert result.message == (f"error: sandbox server at {address} unreachable (down or restarting): "
                              "UNAVAILABLE (no connection within 0.5s)")


def test_configured_defaults_above_the_ceiling_are_allowed() -> None:
    servicer = SandboxServicer(defaults=SandboxLimits(wall_time_s=600.0))
    limits = limits_from_proto(sandbox_pb2.ExecuteLimits(), servicer.defaults, servicer.ceiling)

    assert limits.wall_time_s == 600.0


def test_server_is_non_dumpable_and_its_environment_no_longer_holds_the_token(sandbox_server: ServerProcess) -> None:
    status = Path(f"/proc/{sandbox_server.process.pid}/status").read_text()
    environ = Path(f"/proc/{sandbox_server.process.pid}/environ").read_bytes()  # root may still look

    assert os.stat(f"/proc/{sandbox_server.process.pid}/environ").st_uid == 0  # non-dumpable: root-owned
    assert "NoNewPrivs" in status
    assert TOKEN.encode() not in environ


def test_server_logs_the_layers_in_force_at_startup() -> None:
    server = start_server()
    try:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=15)
    finally:
        stop_server(server)
    assert server.process.stderr is not None
    first_line = server.process.stderr.readline()
    assert first_line == ("flowlane sandbox: layers in force: network_namespace, private_tmp, rlimits, no_new_privs, "
                          "unprivileged_uid, process_tracking, landlock, seccomp, audit_hook, non_dumpable_caller\n")


async def test_code_cannot_signal_the_server(runner: RemoteCodeRunner, sandbox_server: ServerProcess) -> None:
    result = await runner.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('sent')")

    assert result.error_kind is SandboxErrorKind.ERROR
    assert "PermissionError: [Errno 1] Operation not permitted" in result.message
    assert sandbox_server.process.poll() is None
