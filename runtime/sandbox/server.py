"""The tool sandbox as a gRPC service, and the client the agent's code tool uses to reach it.

In a FlowRun, rollout workers do not run LLM-written code themselves: they send it to sandbox
components (pods on a cluster, processes locally) so that the worker and its vLLM engine never
share a machine's limits with untrusted code, and sandboxes scale on their own. The server is a
thin shell around ``runtime/sandbox/runner.py`` (which does the isolating): it translates messages,
bounds concurrency, caps requested limits at its ceiling, and turns anything unexpected into a
failed result instead of a failed RPC.

``RemoteCodeRunner`` implements the same ``CodeRunner`` protocol as the local sandbox. Whatever
happens to the server (killed, restarting, unreachable, wrong token) it returns a
``SandboxResult`` with ``ok=False`` and a message saying so: the agent records a tool error and
goes on, nothing raises.

``sandbox`` is the ``flowlane sandbox`` command (a FlowRun component): it serves until SIGTERM or
SIGINT, then finishes the runs in flight within a grace period.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import grpc
import grpc.aio
import typer

from flowlane.api import sandbox_pb2, sandbox_pb2_grpc
from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.kit import grpc_common, logs
from flowlane.runtime.sandbox.layers import IsolationLayer, make_non_dumpable, missing_mandatory_layers
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxErrorKind, SandboxResult
from flowlane.runtime.sandbox.runner import LocalCodeRunner, probe_isolation

MiB = 1024 * 1024
#: The most any request may ask for; a request's larger values are lowered to these.
DEFAULT_CEILING = SandboxLimits(cpu_time_s=60.0, wall_time_s=120.0, memory_bytes=4096 * MiB, max_processes=64,
                                max_file_bytes=256 * MiB, max_output_bytes=1 * MiB, max_open_files=1024)
#: How long a client waits for a connection before reporting the server unreachable.
CONNECT_TIMEOUT_S = 3.0
#: Time on top of the wall-clock limit a client waits for an answer (queueing, process start-up).
RPC_MARGIN_S = 30.0
SHUTDOWN_GRACE_S = 10.0

_LIMIT_FIELDS = [f.name for f in dataclasses.fields(SandboxLimits)]


# --- message translation (pure) ---------------------------------------------------------------


def limits_to_proto(limits: SandboxLimits) -> sandbox_pb2.ExecuteLimits:
    return sandbox_pb2.ExecuteLimits(**{name: getattr(limits, name) for name in _LIMIT_FIELDS})


def limits_from_proto(
    message: sandbox_pb2.ExecuteLimits, defaults: SandboxLimits, ceiling: SandboxLimits = DEFAULT_CEILING
) -> SandboxLimits:
    """The limits a request gets: its own values, 0 meaning the default, each capped at the ceiling."""
    values = {}
    for name in _LIMIT_FIELDS:
        requested = getattr(message, name) or getattr(defaults, name)
        values[name] = min(requested, getattr(ceiling, name))
    return SandboxLimits(**values)


def result_to_proto(result: SandboxResult) -> sandbox_pb2.ExecuteResult:
    return sandbox_pb2.ExecuteResult(
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        ok=result.ok,
        error_kind=result.error_kind.value if result.error_kind else "",
        truncated=result.truncated,
        duration_s=result.duration_s,
        message=result.message,
        isolation=[layer.value for layer in result.isolation],
    )


def result_from_proto(message: sandbox_pb2.ExecuteResult) -> SandboxResult:
    kinds = {kind.value for kind in SandboxErrorKind}
    layers = {layer.value for layer in IsolationLayer}
    return SandboxResult(
        stdout=message.stdout,
        stderr=message.stderr,
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        ok=message.ok,
        # A kind this client does not know (a newer server) still reads as a failure.
        error_kind=(SandboxErrorKind(message.error_kind) if message.error_kind in kinds
                    else SandboxErrorKind.ERROR if message.error_kind else None),
        message=message.message,
        truncated=message.truncated,
        duration_s=message.duration_s,
        isolation=tuple(IsolationLayer(v) for v in message.isolation if v in layers),
    )


# --- the server ----------------------------------------------------------------------------------


class SandboxServicer(sandbox_pb2_grpc.SandboxServicer):
    """Runs each ``Execute`` through a ``LocalCodeRunner``; never fails the RPC for the code."""

    def __init__(self, max_concurrency: int = 4, defaults: SandboxLimits | None = None,
                 ceiling: SandboxLimits = DEFAULT_CEILING) -> None:
        self.max_concurrency = max_concurrency
        self.defaults = defaults or SandboxLimits()
        # The operator's configured defaults are always allowed, even above the built-in ceiling.
        self.ceiling = SandboxLimits(**{name: max(getattr(ceiling, name), getattr(self.defaults, name))
                                        for name in _LIMIT_FIELDS})
        self.runner = LocalCodeRunner(self.defaults, max_concurrency=max_concurrency)
        self.active = 0  # executions running or waiting for a slot

    async def Execute(
        self, request: sandbox_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.ExecuteResult:
        limits = limits_from_proto(request.limits, self.defaults, self.ceiling)
        self.active += 1
        try:
            result = await self.runner.run(request.code, limits)
        except Exception as err:  # a broken host, not the code: report it, keep serving
            result = SandboxResult("", "", None, False, SandboxErrorKind.ERROR,
                                   f"error: the sandbox server could not run the code ({type(err).__name__}: {err})")
        finally:
            self.active -= 1
        return result_to_proto(result)

    async def Health(
        self, request: sandbox_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.HealthReply:
        return sandbox_pb2.HealthReply(serving=True, active=self.active, max_concurrency=self.max_concurrency)


async def start_sandbox_server(
    host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, max_concurrency: int = 4,
    defaults: SandboxLimits | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a Sandbox server; returns it and the bound port. Needs a token (see grpc_common)."""
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    server = grpc_common.create_server(token)
    sandbox_pb2_grpc.add_SandboxServicer_to_server(SandboxServicer(max_concurrency, defaults), server)
    bound = grpc_common.bind_port(server, host, port)
    await server.start()
    return server, bound


# --- the client ----------------------------------------------------------------------------------


class RemoteCodeRunner:
    """A ``CodeRunner`` backed by a Sandbox server at ``address`` (``host:port``).

    Without ``limits`` (here or per call) the server's defaults apply: in a FlowRun those are the
    spec's ``sandbox.limits``, configured where the code runs. Never raises for a server problem:
    an unreachable, restarting or refusing server gives a ``SandboxResult`` with ``ok=False``, kind
    ``error`` and a message naming the address.
    """

    def __init__(self, address: str, token: str | None = None, *, limits: SandboxLimits | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, rpc_margin_s: float = RPC_MARGIN_S) -> None:
        self.address = address
        self.token = token
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s
        self.rpc_margin_s = rpc_margin_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: sandbox_pb2_grpc.SandboxStub | None = None

    def _client(self) -> tuple[grpc.aio.Channel, sandbox_pb2_grpc.SandboxStub]:
        if self._channel is None or self._stub is None:  # lazily: an aio channel belongs to the running loop
            self._channel = grpc_common.open_channel(self.address, self.token)
            self._stub = sandbox_pb2_grpc.SandboxStub(self._channel)
        return self._channel, self._stub

    async def _connected(self, channel: grpc.aio.Channel) -> bool:
        """Wait up to ``connect_timeout_s`` for a connection. A plain call fails at once while the
        channel is between reconnect attempts; waiting here lets a just-restarted server answer."""
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        limits = limits or self.limits
        request = sandbox_pb2.ExecuteRequest(
            code=code, limits=limits_to_proto(limits) if limits else sandbox_pb2.ExecuteLimits())
        wall_time_s = limits.wall_time_s if limits else DEFAULT_CEILING.wall_time_s
        channel, stub = self._client()
        if not await self._connected(channel):
            return self._failure(grpc.StatusCode.UNAVAILABLE, f"no connection within {self.connect_timeout_s:g}s")
        try:
            reply = await stub.Execute(request, timeout=wall_time_s + self.rpc_margin_s)
        except grpc.aio.AioRpcError as err:
            return self._failure(err.code(), err.details() or "")
        except (grpc.RpcError, OSError) as err:  # anything else from the transport
            return self._failure(None, str(err))
        return result_from_proto(reply)

    def _failure(self, code: grpc.StatusCode | None, details: str) -> SandboxResult:
        status = code.name if code is not None else "error"
        why = {
            grpc.StatusCode.UNAVAILABLE: "unreachable (down or restarting)",
            grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time",
            grpc.StatusCode.UNAUTHENTICATED: "refused the token (check FLOWLANE_GRPC_TOKEN)",
        }.get(code, "failed") if code is not None else "failed"
        message = f"error: sandbox server at {self.address} {why}: {status}"
        if details:
            message += f" ({details.splitlines()[0][:200]})"
        return SandboxResult("", "", None, False, SandboxErrorKind.ERROR, message,
                             details={"grpc_status": status, "address": self.address})

    async def health(self) -> sandbox_pb2.HealthReply:
        """The server's health reply; raises ``grpc.aio.AioRpcError`` when it cannot be reached."""
        reply: sandbox_pb2.HealthReply = await self._client()[1].Health(sandbox_pb2.HealthRequest(), timeout=5)
        return reply

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None


# --- the command ---------------------------------------------------------------------------------


def limits_from_spec(spec_limits: Any) -> SandboxLimits:
    """Server defaults from a FlowRun's ``spec.sandbox.limits`` (api/flowrun.py's SandboxLimits)."""
    return SandboxLimits(
        cpu_time_s=spec_limits.cpu_time_seconds,
        wall_time_s=spec_limits.wall_time_seconds,
        memory_bytes=spec_limits.memory_mib * MiB,
        max_processes=spec_limits.processes,
        max_file_bytes=max(1, spec_limits.file_size_mib * MiB),  # 0 MiB: no file may grow past a byte
        max_output_bytes=spec_limits.output_bytes,
    )


def take_token_from_environment() -> str:
    """The gRPC token (``require_token``), then gone from the environment: unset, and its bytes in
    the process's initial environment block zeroed, so ``/proc/<pid>/environ`` no longer shows it
    and no child can inherit it. From here on it lives only in this process's memory."""
    token = grpc_common.require_token()
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    for name in (grpc_common.TOKEN_ENV, grpc_common.TOKEN_FILE_ENV):
        value = libc.getenv(name.encode())
        if value:
            ctypes.memset(value, 0, len(ctypes.string_at(value)))
        os.environ.pop(name, None)
    return token


def check_isolation(allow_weak: bool) -> tuple[IsolationLayer, ...]:
    """Probe the layers a run gets here; refuse (ConfigError naming them) when a mandatory one is
    missing, unless ``allow_weak``. Returns the layers in force."""
    layers = asyncio.run(probe_isolation())
    missing = missing_mandatory_layers(layers)
    if missing and not allow_weak:
        raise ConfigError(
            f"sandbox layers missing on this machine: {', '.join(missing)}; untrusted code would run without "
            "them. Set spec.sandbox.allowWeakIsolation: true (or pass --allow-weak-isolation) to run anyway")
    return layers


def sandbox(
    port: Annotated[int, typer.Option(help="TCP port to serve on (0 picks a free one, printed on start).")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 inside a pod.")] = "127.0.0.1",
    max_concurrency: Annotated[int, typer.Option(help="Code runs executing at once; more requests queue.")] = 4,
    config: Annotated[Path | None, typer.Option(
        help="The rendered FlowRun (run config YAML); its spec.sandbox.limits become the defaults.")] = None,
    allow_weak_isolation: Annotated[bool, typer.Option(
        help="Serve even when a mandatory sandbox layer (seccomp, Landlock, ...) is missing on this machine.")] = False,
    log_format: Annotated[str | None, typer.Option(help=logs.LOG_FORMAT_HELP)] = None,
) -> None:
    """Serve the tool sandbox over gRPC until SIGTERM/SIGINT. The token comes from FLOWLANE_GRPC_TOKEN."""
    make_non_dumpable()  # first: same-uid code must never read this process's memory or environ
    token = take_token_from_environment()
    logs.configure("sandbox", log_format=log_format)
    defaults = None
    if config is not None:
        from flowlane.api.flowrun import load_flowrun

        spec = load_flowrun(config).spec.sandbox
        defaults = limits_from_spec(spec.limits)
        allow_weak_isolation = allow_weak_isolation or spec.allow_weak_isolation
    layers = check_isolation(allow_weak_isolation)
    missing = missing_mandatory_layers(layers)
    print(f"flowlane sandbox: layers in force: {', '.join(layer.value for layer in layers)}"
          + (f" (missing, allowed by allowWeakIsolation: {', '.join(missing)})" if missing else ""),
          file=sys.stderr, flush=True)
    asyncio.run(_serve(host, port, max_concurrency, defaults, token))


async def _serve(host: str, port: int, max_concurrency: int, defaults: SandboxLimits | None,
                 token: str | None = None) -> None:
    server, bound = await start_sandbox_server(host, port, token=token, max_concurrency=max_concurrency,
                                               defaults=defaults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"flowlane sandbox: serving on {host}:{bound} (max concurrency {max_concurrency})", flush=True)
    await stop.wait()
    print("flowlane sandbox: stopping", flush=True)
    await server.stop(SHUTDOWN_GRACE_S)


def main() -> None:
    """``python -m flowlane.runtime.sandbox.server``: the command without the flowlane CLI around it."""
    try:
        typer.run(sandbox)
    except FlowlaneError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
