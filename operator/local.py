"""The local backend: a FlowRun's process graph as supervised processes on this machine.

On Kubernetes the kubelet starts each component in a pod, restarts it with a growing back-off
when it crashes, and the garbage collector removes everything when the run goes away. On one
machine this module plays those roles for the components of ``graph.compile_graph``, so that
``flowlane run`` behaves like the cluster:

- **Ports.** Every declared port gets a free loopback port (a pod's fixed numbers would collide
  here), or the number the caller asks for in ``port_overrides``; a requested port that is taken
  fails the whole start before anything runs, naming the port. The graph's placeholders
  (``{address:learner.grpc}``, ``{port:sandbox-0.grpc}``) are then filled with loopback values.
- **Secrets.** ``secret_env`` values come from ``secrets`` (the token, which ``for_graph``
  generates when the graph says so) or from this process's environment; a missing one is an error
  naming the variable before anything starts. ``flowlane`` as a command means this interpreter's
  ``python -m flowlane.cli``, so components run with the same installation as the supervisor.
- **Order.** A component starts when every component it depends on is ready: a gRPC handshake
  (or a TCP connect, for HTTP) on its ``ready_port``, or simply started when it has none.
- **Restarts.** A job that exits non-zero, or a ``service`` (sandbox) that exits at all, is
  restarted after 1 s, 2 s, 4 s, ... up to a cap, like a pod's CrashLoopBackOff; a run of
  ``reset_after_s`` without a crash resets the back-off. Past ``restart_limit`` restarts of one
  component the run fails. A job that exits 0 is done.
- **No orphans.** Every component is its own process group (session), so a stop reaches its
  children too: SIGTERM to the group, a grace period, then SIGKILL. If the supervisor itself is
  killed, the kernel sends each component SIGKILL (``PR_SET_PDEATHSIG``), and a small watchdog
  process that holds the other end of a pipe kills every process group the supervisor had
  registered, grandchildren included.

Logs go to ``<run_dir>/logs/<component>.log`` (stdout and stderr together, appended across
restarts). The API is asyncio: ``start()``, ``wait()``, ``stop()``, and an ``on_event`` callback
that sees every start, readiness, exit, restart and failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from flowlane.api.errors import FlowlaneError
from flowlane.operator.graph import ENV_GRPC_TOKEN, Component, ProcessGraph, resolve
from flowlane.operator.graph import Protocol as PortProtocol

LOOPBACK = "127.0.0.1"
#: torch.distributed's rendezvous settings. A component never inherits them: each learner sets up
#: its own group (one rank on a free port, or torchrun for several), and a MASTER_PORT left in the
#: caller's environment (a shell under torchrun, a test process that ran DeepSpeed) names a port
#: that is already taken, so the learner's TCPStore failed with EADDRINUSE and the run never started.
RENDEZVOUS_ENV = frozenset({"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                            "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"})
_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


class PortInUseError(FlowlaneError):
    """A component asked for a fixed port that another process holds."""


class StartupError(FlowlaneError):
    """A component did not become ready, or the graph itself is unusable."""


class ReadinessKind(StrEnum):
    NONE = "none"  # ready as soon as the process is started
    TCP = "tcp"  # a TCP connect to the port succeeds
    GRPC = "grpc"  # a gRPC server answers the HTTP/2 handshake on the port


@dataclass(frozen=True)
class RestartPolicy:
    restart_limit: int = 6  # restarts allowed per component before the run fails
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    reset_after_s: float = 60.0  # a run this long without crashing resets the back-off
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL
    ready_timeout_s: float = 300.0  # from process start until its ready port answers (model loading)

    def backoff_s(self, consecutive_crashes: int) -> float:
        """Delay before restart number ``consecutive_crashes`` (1-based): 1, 2, 4, ... capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, consecutive_crashes - 1))


class ComponentState(StrEnum):
    PENDING = "pending"  # waiting for dependencies
    STARTING = "starting"  # started, not ready yet
    READY = "ready"
    BACKOFF = "backoff"  # crashed, waiting to restart
    COMPLETED = "completed"  # a job that exited 0
    FAILED = "failed"  # restart limit reached
    STOPPED = "stopped"


class EventKind(StrEnum):
    STARTED = "started"
    READY = "ready"
    EXITED = "exited"
    RESTARTING = "restarting"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SupervisorEvent:
    kind: EventKind
    component: str
    message: str = ""
    pid: int | None = None
    exit_code: int | None = None  # negative: killed by that signal
    restarts: int = 0
    delay_s: float = 0.0  # RESTARTING: back-off before the next start
    time: float = field(default_factory=time.time)


class RunOutcome(StrEnum):
    COMPLETED = "completed"  # every job (non-service component) exited 0
    FAILED = "failed"  # a component hit its restart limit or never became ready
    STOPPED = "stopped"  # stop() (or a signal) ended the run


@dataclass
class ComponentStatus:
    name: str
    state: ComponentState = ComponentState.PENDING
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)


# --- pure helpers ------------------------------------------------------------------------------


def dependency_levels(components: Sequence[Component]) -> list[list[str]]:
    """Component names grouped so each group depends only on earlier groups.

    Raises ``StartupError`` for duplicate names, unknown dependencies and cycles.
    """
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StartupError(f"duplicate component names: {', '.join(duplicates)}")
    by_name = {c.name: c for c in components}
    for c in components:
        unknown = [d for d in c.depends_on if d not in by_name]
        if unknown:
            raise StartupError(f"component {c.name!r} depends on unknown component(s): {', '.join(unknown)}")
    levels: list[list[str]] = []
    placed: set[str] = set()
    remaining = list(names)
    while remaining:
        level = [n for n in remaining if all(d in placed for d in by_name[n].depends_on)]
        if not level:
            raise StartupError(f"dependency cycle among components: {', '.join(remaining)}")
        levels.append(level)
        placed.update(level)
        remaining = [n for n in remaining if n not in placed]
    return levels


def render(text: str, ports: Mapping[str, Mapping[str, int]]) -> str:
    """Fill the graph's ``{port:comp.name}`` / ``{address:comp.name}`` placeholders with loopback values."""

    def port_of(component: str, port_name: str) -> int:
        try:
            return ports[component][port_name]
        except KeyError:
            raise StartupError(f"a placeholder names port {port_name!r} of component {component!r}, "
                               "which the graph does not declare") from None

    return resolve(text, lambda c, p: f"{LOOPBACK}:{port_of(c, p)}", port_of)


def readiness_of(component: Component) -> tuple[ReadinessKind, str]:
    """How to tell ``component`` is ready: the probe kind and the port name to probe."""
    if component.ready_port is None:
        return ReadinessKind.NONE, ""
    protocol = component.port(component.ready_port).protocol
    return (ReadinessKind.GRPC if protocol is PortProtocol.GRPC else ReadinessKind.TCP), component.ready_port


def local_argv(argv: Sequence[str]) -> list[str]:
    """``flowlane ...`` runs with this interpreter, so components share the supervisor's installation."""
    if argv and argv[0] == "flowlane":
        return [sys.executable, "-m", "flowlane.cli", *argv[1:]]
    if argv and argv[0] == "torchrun":  # the launcher of this interpreter, whatever is on PATH
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return list(argv)


def allocate_ports(
    components: Sequence[Component],
    overrides: Mapping[str, Mapping[str, int]] | None = None,
    host: str = LOOPBACK,
) -> dict[str, dict[str, int]]:
    """Choose a port for every declared port: ``overrides[component][port]`` if given, else any free one.

    All probe sockets stay open until every port is chosen, so two components never get the
    same port. Raises ``PortInUseError`` naming the component, port name and number.
    """
    overrides = overrides or {}
    chosen: dict[str, dict[str, int]] = {}
    probes: list[socket.socket] = []
    try:
        for c in components:
            chosen[c.name] = {}
            for port in c.ports:
                requested = overrides.get(c.name, {}).get(port.name, 0)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, requested))
                except OSError as err:
                    if err.errno == errno.EADDRINUSE:
                        raise PortInUseError(
                            f"component {c.name!r} port {port.name!r}: {host}:{requested} is already in use; "
                            "stop the process holding it or request another port (0 picks a free one)"
                        ) from None
                    raise PortInUseError(f"component {c.name!r} port {port.name!r}: cannot bind "
                                         f"{host}:{requested} ({err.strerror})") from None
                chosen[c.name][port.name] = int(sock.getsockname()[1])
    finally:
        for sock in probes:
            sock.close()
    return chosen


def secret_values(
    components: Sequence[Component], secrets: Mapping[str, str], environ: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Per component, the ``secret_env`` values a local process gets (from ``secrets``, else ``environ``).

    Raises ``StartupError`` naming the first variable found in neither.
    """
    values: dict[str, dict[str, str]] = {}
    for c in components:
        values[c.name] = {}
        for env_name, ref in c.secret_env.items():
            value = secrets.get(env_name, environ.get(env_name))
            if value is None:
                raise StartupError(
                    f"component {c.name!r} needs {env_name} (Secret {ref.secret!r}, key {ref.key!r} on "
                    f"Kubernetes): set {env_name} in the environment for a local run"
                )
            values[c.name][env_name] = value
    return values


# --- processes ---------------------------------------------------------------------------------


def _libc_prctl() -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or path is None:
        return None
    prctl: Callable[..., int] = ctypes.CDLL(path, use_errno=True).prctl
    return prctl


_PRCTL = _libc_prctl()  # resolved before any fork: no dynamic loading in a forked child


def _child_preexec(parent_pid: int) -> Callable[[], None]:
    """Runs in the forked child before exec: die with the supervisor, even by SIGKILL."""

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the supervisor died between fork and prctl
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to a process group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _probe_tcp(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _probe_grpc(port: int, timeout_s: float) -> bool:
    from flowlane.runtime.grpc_common import wait_for_channel

    return await wait_for_channel(f"{LOOPBACK}:{port}", timeout_s)


class _Watchdog:
    """A helper process that kills registered process groups when the supervisor disappears.

    It reads ``+<pgid>`` / ``-<pgid>`` lines on stdin; end of input (the supervisor exited, by
    any means) makes it SIGKILL every group still registered, then exit.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowlane.operator.local", "--watchdog",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )

    def _send(self, line: str) -> None:
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(line.encode())

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    async def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


def _watchdog_main() -> None:
    """Entry point of the watchdog process (``python -m flowlane.operator.local --watchdog``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("+"):
            groups.add(int(line[1:]))
        elif line.startswith("-"):
            groups.discard(int(line[1:]))
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)


# --- the supervisor ----------------------------------------------------------------------------


class _Running:
    """Book-keeping for one component's current process."""

    def __init__(self, component: Component) -> None:
        self.component = component
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()  # first readiness; dependents wait on it
        self.task: asyncio.Task[None] | None = None
        self.crashes_in_a_row = 0


class LocalSupervisor:
    """Starts, supervises and stops a list of components as local processes.

    Typical use::

        supervisor = LocalSupervisor.for_graph(graph, run_dir, policy, on_event=print)
        await supervisor.start()          # raises PortInUseError / StartupError, nothing left running
        outcome = await supervisor.wait()  # COMPLETED, FAILED or STOPPED
        await supervisor.stop()            # idempotent; also what SIGINT/SIGTERM trigger

    Use it from the main thread's event loop: the kernel's parent-death signal fires when the
    thread that started a child exits, so children must be started by a long-lived thread.
    """

    def __init__(
        self,
        components: Sequence[Component],
        run_dir: Path,
        policy: RestartPolicy | None = None,
        *,
        secrets: Mapping[str, str] | None = None,
        port_overrides: Mapping[str, Mapping[str, int]] | None = None,
        on_event: Callable[[SupervisorEvent], None] | None = None,
        common_env: Mapping[str, str] | None = None,
    ) -> None:
        self.levels = dependency_levels(components)
        self.components = {c.name: c for c in components}
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.policy = policy or RestartPolicy()
        self.on_event = on_event
        self.common_env = dict(common_env or {})
        self.secrets = dict(secrets or {})
        self.port_overrides = port_overrides or {}
        self.ports: dict[str, dict[str, int]] = {}
        self._secret_env: dict[str, dict[str, str]] = {}
        self.status: dict[str, ComponentStatus] = {c.name: ComponentStatus(c.name) for c in components}
        self.events: list[SupervisorEvent] = []
        self.outcome: RunOutcome | None = None
        self.failure: str = ""
        self._running: dict[str, _Running] = {c.name: _Running(c) for c in components}
        self._watchdog = _Watchdog()
        self._done = asyncio.Event()
        self._stopping = False
        self._stop_lock = asyncio.Lock()
        self._started = False
        self._signal_stop: asyncio.Task[None] | None = None

    @classmethod
    def for_graph(
        cls,
        graph: ProcessGraph,
        run_dir: Path,
        policy: RestartPolicy | None = None,
        *,
        token: str | None = None,
        **kwargs: Any,
    ) -> LocalSupervisor:
        """A supervisor for every component of ``graph``. The shared gRPC token is ``token``, else
        ``$FLOWLANE_GRPC_TOKEN``, else (when the graph leaves it to the backend) a fresh one."""
        from flowlane.runtime.grpc_common import generate_token

        token = token or os.environ.get(ENV_GRPC_TOKEN) or (generate_token() if graph.token_generated else None)
        secrets = dict(kwargs.pop("secrets", None) or {})
        if token:
            secrets.setdefault(ENV_GRPC_TOKEN, token)
        return cls(graph.components, run_dir, policy, secrets=secrets, **kwargs)

    # --- public API ---

    def address(self, component: str, port_name: str) -> str:
        return f"{LOOPBACK}:{self.ports[component][port_name]}"

    async def start(self) -> None:
        """Allocate ports, then start components level by level, waiting for readiness.

        On any failure everything already started is stopped before the error is raised.
        """
        if self._started:
            raise StartupError("LocalSupervisor.start() called twice")
        self._started = True
        components = list(self.components.values())
        self._secret_env = secret_values(components, self.secrets, os.environ)
        self.ports = allocate_ports(components, self.port_overrides)
        for name, ports in self.ports.items():
            self.status[name].ports = dict(ports)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        await self._watchdog.start()
        try:
            for level in self.levels:
                for name in level:
                    self._running[name].task = asyncio.create_task(self._supervise(name), name=f"supervise-{name}")
                if not await self._await_ready(level):
                    return
        except BaseException:
            await self.stop()
            raise

    async def wait(self) -> RunOutcome:
        """Block until the run completes, fails, or is stopped; everything is stopped on return."""
        await self._done.wait()
        await self.stop()
        assert self.outcome is not None
        return self.outcome

    async def stop(self) -> None:
        """Stop every component: dependents first, SIGTERM, grace period, SIGKILL. Idempotent."""
        async with self._stop_lock:
            if not self._stopping:
                self._stopping = True
                self._finish(RunOutcome.STOPPED, "stopped")
                for level in reversed(self.levels):
                    await asyncio.gather(*(self._stop_component(n) for n in level))
                for running in self._running.values():
                    if running.task is not None:
                        running.task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await running.task
                await self._watchdog.close()

    def install_signal_handlers(self) -> None:
        """Stop gracefully on the first SIGINT/SIGTERM; a second one kills every group at once."""
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if self._stopping:
                self.kill_now()
                return
            self._signal_stop = loop.create_task(self.stop(), name=f"stop-on-{sig.name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

    def kill_now(self) -> None:
        """SIGKILL every component's process group immediately."""
        for running in self._running.values():
            if running.process is not None and running.process.returncode is None:
                _signal_group(running.process.pid, signal.SIGKILL)

    # --- internals ---

    def _emit(self, kind: EventKind, name: str, message: str = "", *, exit_code: int | None = None,
              delay_s: float = 0.0) -> None:
        status = self.status[name]
        event = SupervisorEvent(kind, name, message, pid=status.pid, exit_code=exit_code,
                                restarts=status.restarts, delay_s=delay_s)
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a broken progress display must not take the run down
                log.exception("on_event callback failed for %s", event)

    def _finish(self, outcome: RunOutcome, message: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.failure = message if outcome is RunOutcome.FAILED else ""
        self._done.set()

    async def _await_ready(self, level: list[str]) -> bool:
        """True when every component of ``level`` is ready; False when the run ended meanwhile
        (completed or stopped). Raises ``StartupError`` when it failed."""
        all_ready: asyncio.Future[object] = asyncio.ensure_future(
            asyncio.gather(*(self._running[n].ready.wait() for n in level)))
        run_done: asyncio.Future[object] = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({all_ready, run_done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            all_ready.cancel()
            run_done.cancel()
        if self._done.is_set():
            if self.outcome is RunOutcome.FAILED:
                raise StartupError(self.failure)
            return False
        return True

    def _rendered(self, component: Component) -> tuple[list[str], dict[str, str]]:
        argv = [render(arg, self.ports) for arg in local_argv(component.argv)]
        inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.common_env,
               **{k: render(v, self.ports) for k, v in component.env.items()},
               **self._secret_env[component.name]}
        return argv, env

    async def _spawn(self, name: str, log: IO[bytes]) -> asyncio.subprocess.Process:
        component = self.components[name]
        argv, env = self._rendered(component)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True,
                preexec_fn=_child_preexec(os.getpid()),
            )
        except OSError as err:
            raise StartupError(f"component {name!r}: cannot run {argv[0]!r} ({err.strerror})") from None
        self._watchdog.register(process.pid)
        return process

    async def _wait_ready(self, name: str, process: asyncio.subprocess.Process) -> bool:
        """True once the component is ready; False if its process exited or it timed out."""
        kind, port_name = readiness_of(self.components[name])
        if kind is ReadinessKind.NONE:
            return True
        port = self.ports[name][port_name]
        deadline = time.monotonic() + self.policy.ready_timeout_s
        while process.returncode is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if kind is ReadinessKind.TCP:
                ok = await _probe_tcp(port)
            else:
                ok = await _probe_grpc(port, min(left, 1.0))
            if ok:
                return process.returncode is None
            await asyncio.sleep(0.1)
        return False

    async def _supervise(self, name: str) -> None:
        """Run one component until it completes, fails for good, or the supervisor stops."""
        try:
            await self._supervise_loop(name)
        except Exception as err:  # a bug here must end the run, never leave it hanging
            message = f"supervising component {name!r} failed: {type(err).__name__}: {err}"
            self.status[name].state = ComponentState.FAILED
            self._emit(EventKind.FAILED, name, message)
            self._finish(RunOutcome.FAILED, message)

    async def _supervise_loop(self, name: str) -> None:
        component = self.components[name]
        running = self._running[name]
        status = self.status[name]
        status.log_path = self.log_dir / f"{name}.log"
        with status.log_path.open("ab") as log:
            while not self._stopping:
                log.write(f"--- flowlane: start {status.restarts + 1} of {name} at {time.ctime()} ---\n".encode())
                log.flush()
                try:
                    process = await self._spawn(name, log)
                except StartupError as err:
                    status.state = ComponentState.FAILED
                    self._emit(EventKind.FAILED, name, str(err))
                    self._finish(RunOutcome.FAILED, str(err))
                    return
                running.process = process
                status.pid = process.pid
                status.state = ComponentState.STARTING
                started_at = time.monotonic()
                self._emit(EventKind.STARTED, name, " ".join(self._rendered(component)[0]))
                ready_task = asyncio.create_task(self._mark_ready(name, process))
                code = await process.wait()
                ready_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready_task
                # The leader is gone; anything it left in its group goes too.
                _signal_group(process.pid, signal.SIGKILL)
                self._watchdog.forget(process.pid)
                status.last_exit_code = code
                if self._stopping:
                    return
                self._emit(EventKind.EXITED, name, f"exit code {code}", exit_code=code)
                if code == 0 and not component.service:
                    status.state = ComponentState.COMPLETED
                    self._emit(EventKind.COMPLETED, name, exit_code=code)
                    self._check_completed()
                    return
                if time.monotonic() - started_at >= self.policy.reset_after_s:
                    running.crashes_in_a_row = 0
                running.crashes_in_a_row += 1
                if status.restarts >= self.policy.restart_limit:
                    status.state = ComponentState.FAILED
                    message = (f"component {name!r} exited with code {code} after {status.restarts} restarts "
                               f"(limit {self.policy.restart_limit}); see {status.log_path}")
                    self._emit(EventKind.FAILED, name, message, exit_code=code)
                    self._finish(RunOutcome.FAILED, message)
                    return
                delay = self.policy.backoff_s(running.crashes_in_a_row)
                status.state = ComponentState.BACKOFF
                status.restarts += 1
                self._emit(EventKind.RESTARTING, name, f"restart {status.restarts} in {delay:.1f}s",
                           exit_code=code, delay_s=delay)
                await asyncio.sleep(delay)

    async def _mark_ready(self, name: str, process: asyncio.subprocess.Process) -> None:
        if await self._wait_ready(name, process):
            self.status[name].state = ComponentState.READY
            self._running[name].ready.set()
            self._emit(EventKind.READY, name)
        elif process.returncode is None:  # timed out: stop waiting on it for good
            port_name = readiness_of(self.components[name])[1]
            message = (f"component {name!r} was not ready on port {port_name!r} "
                       f"({LOOPBACK}:{self.ports[name][port_name]}) within {self.policy.ready_timeout_s:g}s; "
                       f"see {self.status[name].log_path}")
            self.status[name].state = ComponentState.FAILED
            self._emit(EventKind.FAILED, name, message)
            self._finish(RunOutcome.FAILED, message)

    def _check_completed(self) -> None:
        jobs = [c.name for c in self.components.values() if not c.service]
        if jobs and all(self.status[n].state is ComponentState.COMPLETED for n in jobs):
            self._finish(RunOutcome.COMPLETED, "")

    async def _stop_component(self, name: str) -> None:
        running = self._running[name]
        process = running.process
        status = self.status[name]
        if process is not None and process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.policy.stop_grace_s)
            except TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if process is not None:
            # Children that outlived the leader, or ignored SIGTERM.
            _signal_group(process.pid, signal.SIGKILL)
            self._watchdog.forget(process.pid)
            status.last_exit_code = process.returncode
        if status.state not in (ComponentState.COMPLETED, ComponentState.FAILED, ComponentState.PENDING):
            status.state = ComponentState.STOPPED
            self._emit(EventKind.STOPPED, name, exit_code=process.returncode if process else None)


if __name__ == "__main__":
    if sys.argv[1:] == ["--watchdog"]:
        _watchdog_main()
    else:
        sys.exit("usage: python -m flowlane.operator.local --watchdog (started by LocalSupervisor)")
