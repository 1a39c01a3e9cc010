"""Where a served agent's python tool runs: a sandbox server, never the gateway's own process.

The gateway process holds what an attacker wants: the API key clients authenticate with, the S3
credentials the checkpoint came from, the keys of networked tools. Model-written code must not run
next to them, not even in a subprocess that inherits their environment. So the gateway sends code
over gRPC to the tool-sandbox server (``flowlane sandbox``, ``runtime/sandbox/server.py``), the
same server and rules a FlowRun's rollout workers use:

- **local child** (the default): the gateway starts the server as a child process on a loopback
  port, with a fresh gRPC token and an environment built from an allowlist (``child_env``): the
  interpreter's search path and locale, and nothing else the gateway was given. The child is
  restarted if it dies, and stopped with the gateway. It also dies *with* the gateway: a gateway
  killed by SIGKILL or the OOM killer runs no clean-up, and outside a pod nothing else would stop
  the orphan. The child runs this module (``child_main``), which arms ``PR_SET_PDEATHSIG`` first
  (the kernel sends SIGKILL when the parent exits, by any means) and checks that its parent is
  still the gateway's pid, which closes the race of a gateway dying before the signal was armed;
  then it runs the ``flowlane sandbox`` command, whose code runs die with it in turn.
- **remote** (``--sandbox-address``): sandbox pods or any server reached by ``host:port``; the
  token comes from ``FLOWLANE_GRPC_TOKEN`` (or its ``_FILE`` twin) as for every gRPC client.

Either way the tool gets a ``CodeRunner`` and a server problem becomes a failed tool result,
never a failed request (``RemoteCodeRunner``'s contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import grpc

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.kit import grpc_common
from flowlane.runtime.sandbox import server as sandbox_server
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxResult
from flowlane.runtime.sandbox.server import RemoteCodeRunner

log = logging.getLogger(__name__)

#: Environment variables a sandbox child inherits: what the interpreter needs to start and to
#: read text, nothing with a secret in it. Everything else the gateway holds stays behind.
CHILD_ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
#: Settings meant for the sandbox server itself (its own options) pass through by this prefix.
CHILD_ENV_PREFIX = "FLOWLANE_SANDBOX_"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
RESTART_BACKOFF_S = 1.0
#: prctl(2) option (<linux/prctl.h>): the signal this process gets when its parent exits.
PR_SET_PDEATHSIG = 1
#: The first argument of ``child_main``: the pid the child must die with.
PARENT_PID_FLAG = "--parent-pid"
CHILD_MODULE = "flowlane.runtime.serving.sandbox"


def child_env(parent: Mapping[str, str], token: str) -> dict[str, str]:
    """The sandbox child's environment: the allowlist from ``parent`` and the gRPC token."""
    env = {key: parent[key] for key in CHILD_ENV_ALLOWLIST if key in parent}
    env.update({key: value for key, value in parent.items() if key.startswith(CHILD_ENV_PREFIX)})
    env[grpc_common.TOKEN_ENV] = token
    return env


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SandboxChild:
    """A ``flowlane sandbox`` server run as the gateway's child; a ``CodeRunner`` in front of it.

    ``start`` waits until the server answers its health check (or fails with the server's last
    words). ``run`` restarts a child that died, then sends the code. ``close`` stops it.
    """

    def __init__(self, *, max_concurrency: int = 4, limits: SandboxLimits | None = None,
                 parent_env: Mapping[str, str] | None = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"sandbox max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.limits = limits
        self.start_timeout_s = start_timeout_s
        self._parent_env = dict(os.environ if parent_env is None else parent_env)
        self._token = grpc_common.generate_token()
        self._proc: asyncio.subprocess.Process | None = None
        self._runner: RemoteCodeRunner | None = None
        self._lock: asyncio.Lock | None = None
        # The child's stderr, read back when it fails to start; closed in close().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._closed = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def address(self) -> str | None:
        return self._runner.address if self._runner is not None else None

    async def start(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> None:
        port = _free_loopback_port()
        # The loop's thread forks the child: the death signal follows that thread, the process's
        # main thread under ``flowlane serve``.
        command = [sys.executable, "-m", CHILD_MODULE, PARENT_PID_FLAG, str(os.getpid()), "--host", "127.0.0.1",
                   "--port", str(port), "--max-concurrency", str(self.max_concurrency)]
        self._proc = await asyncio.create_subprocess_exec(
            *command, env=child_env(self._parent_env, self._token), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=self._log, cwd="/")
        if self._runner is not None:
            await self._runner.close()
        self._runner = RemoteCodeRunner(f"127.0.0.1:{port}", self._token, limits=self.limits)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.returncode is not None:
                raise EngineUnavailableError(f"the sandbox server child exited with {self._proc.returncode} "
                                             f"at start-up: {await self._last_words()}")
            try:
                await self._runner.health()
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    await self._stop_process()
                    raise EngineUnavailableError(
                        f"the sandbox server child did not answer within {self.start_timeout_s:g} s") from None
                await asyncio.sleep(0.1)
        log.info("python tool: sandbox server child pid %s on %s", self._proc.pid, self._runner.address)

    async def _last_words(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        self._log.seek(0, os.SEEK_END)
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    async def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        if self._closed:
            raise EngineUnavailableError("the sandbox child is closed")
        if self._proc is None or self._proc.returncode is not None:
            await self._restart()
        assert self._runner is not None
        return await self._runner.run(code, limits)

    async def _restart(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._proc is not None and self._proc.returncode is None:
                return  # another request restarted it meanwhile
            if self._proc is not None:
                log.warning("the sandbox server child exited with %s; restarting it", self._proc.returncode)
                self.restarts += 1
                await asyncio.sleep(RESTART_BACKOFF_S)
            await self._start_locked()

    async def close(self) -> None:
        self._closed = True
        if self._runner is not None:
            await self._runner.close()
        await self._stop_process()
        self._log.close()

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def remote_runner(address: str, *, limits: SandboxLimits | None = None) -> RemoteCodeRunner:
    """A runner for sandbox pods or a server at ``address``; the token from the environment."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--sandbox-address must be HOST:PORT, got {address!r}")
    return RemoteCodeRunner(address, grpc_common.require_token(), limits=limits)


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits, however it exits.

    Exits at once (status 1) if the parent is no longer ``parent_pid``: it died before the signal
    was armed, and this process was already handed to another parent that will never send it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    unused = ctypes.c_ulong(0)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), unused, unused, unused) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        raise SystemExit(f"flowlane sandbox child: its parent {parent_pid} exited before the child started; "
                         "not serving without it")


def child_main(argv: Sequence[str] | None = None) -> None:
    """``python -m flowlane.runtime.serving.sandbox --parent-pid PID [flowlane sandbox options]``.

    The sandbox child's entry point: bound to the gateway's lifetime first, then the sandbox server.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != PARENT_PID_FLAG or not args[1].isdigit():
        raise SystemExit(f"usage: python -m {CHILD_MODULE} {PARENT_PID_FLAG} PID [flowlane sandbox options]")
    die_with_parent(int(args[1]))
    sys.argv = [sys.argv[0], *args[2:]]
    sandbox_server.main()


if __name__ == "__main__":
    child_main()
