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
  component the run fails. A job that exits 0 is done. Members of one ``group`` (the learner
  pods of one torch world, which cannot rejoin it one by one) go down together: when one exits
  non-zero the others are killed, and each starts again after its back-off.
- **No orphans.** Every component is its own process group (session), so a stop reaches its
  children too: SIGTERM to the group, a grace period, then SIGKILL. If the supervisor itself is
  killed, the kernel sends each component SIGKILL (``PR_SET_PDEATHSIG``), and a small watchdog
  process that holds the other end of a pipe kills every process group the supervisor had
  registered, grandchildren included.

Logs go to ``<run_dir>/logs/<component>.log`` (stdout and stderr together, appended across
restarts). The API is asyncio: ``start()``, ``wait()``, ``stop()``, and an ``on_event`` callback
that sees every start, readiness, exit, restart and failure.

This module is the supervisor (``LocalSupervisor``); ``local_plan`` decides order, ports,
placeholders and secrets before anything starts, ``local_processes`` holds the process-group
primitives and the watchdog, ``local_status`` the states, events, outcome and restart policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from flowlane.operator.graph import ENV_GRPC_TOKEN, Component, ProcessGraph
from flowlane.operator.local_plan import (
    LOOPBACK,
    ReadinessKind,
    StartupError,
    allocate_ports,
    dependency_levels,
    local_argv,
    readiness_of,
    render,
    secret_values,
)
from flowlane.operator.local_processes import Watchdog, child_preexec, probe_grpc, probe_tcp, signal_group
from flowlane.operator.local_status import (
    ComponentState,
    ComponentStatus,
    EventKind,
    RestartPolicy,
    RunOutcome,
    SupervisorEvent,
)

#: torch.distributed's rendezvous settings. A component never inherits them: each learner sets up
#: its own group (one rank on a free port, or torchrun for several), and a MASTER_PORT left in the
#: caller's environment (a shell under torchrun, a test process that ran DeepSpeed) names a port
#: that is already taken, so the learner's TCPStore failed with EADDRINUSE and the run never started.
RENDEZVOUS_ENV = frozenset({"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                            "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"})
log = logging.getLogger(__name__)


class _Running:
    """Book-keeping for one component's current process."""

    def __init__(self, component: Component) -> None:
        self.component = component
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()  # first readiness; dependents wait on it
        self.task: asyncio.Task[None] | None = None
        self.crashes_in_a_row = 0
        self.taken_down = False  # killed because another member of its group exited


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
        self._watchdog = Watchdog()
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
        from flowlane.kit.grpc_common import generate_token

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
                signal_group(running.process.pid, signal.SIGKILL)

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
                preexec_fn=child_preexec(os.getpid()),
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
                ok = await probe_tcp(port)
            else:
                ok = await probe_grpc(port, min(left, 1.0))
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
                signal_group(process.pid, signal.SIGKILL)
                self._watchdog.forget(process.pid)
                status.last_exit_code = code
                if self._stopping:
                    return
                self._emit(EventKind.EXITED, name, f"exit code {code}", exit_code=code)
                if component.group and code != 0 and not running.taken_down:
                    self._take_down_group(name)
                running.taken_down = False
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

    def _take_down_group(self, name: str) -> None:
        """Kill the running members of ``name``'s group; their own loops start them again."""
        group = self.components[name].group
        for peer, running in self._running.items():
            process = running.process
            if self.components[peer].group == group and peer != name and process is not None \
                    and process.returncode is None:
                running.taken_down = True
                signal_group(process.pid, signal.SIGKILL)

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
            signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.policy.stop_grace_s)
            except TimeoutError:
                signal_group(process.pid, signal.SIGKILL)
                await process.wait()
            # Children that outlived the leader, or ignored SIGTERM. Only here, just after the
            # leader was reaped: a leader that exited earlier had its group killed then (``_run``),
            # and its pid may since belong to another process's group (pids wrap at pid_max).
            signal_group(process.pid, signal.SIGKILL)
        if process is not None:
            self._watchdog.forget(process.pid)
            status.last_exit_code = process.returncode
        if status.state not in (ComponentState.COMPLETED, ComponentState.FAILED, ComponentState.PENDING):
            status.state = ComponentState.STOPPED
            self._emit(EventKind.STOPPED, name, exit_code=process.returncode if process else None)
