"""The serving gateway: a trained AgentFlow agent behind an OpenAI-compatible HTTP API.

A trained planner is only useful once people can call it, and people already have clients that
speak OpenAI's chat-completions API. The gateway accepts those requests and runs the *whole* agent
behind each one (query analysis, planner turns, tool calls, verifier, solution generator), then
answers with the agent's final answer as the message content and the steps it took in an extra
``agentflow`` field; a streamed request sees every step the moment it happens.

Design points:

- **Concurrency through the engine, not around it.** Every request is one asyncio task running
  ``Agent.run`` against one shared engine; vLLM's continuous batching merges the generations of
  all requests in flight, and its prefix cache reuses the module prompts' shared beginnings.
  Nothing serialises requests; at ``max_concurrent_runs`` agent runs in flight a new request gets
  a 429 with ``Retry-After`` (when a slot is likely free) instead of waiting unseen.
- **The whole conversation.** Earlier turns and system messages reach the agent as a
  ``Conversation``, capped at ``history_max_tokens`` (oldest turns dropped) so that every module
  prompt stays inside the engine's ``max_model_len`` (checked when an engine is attached).
- **Budgets per request.** A request may ask for ``max_turns`` and ``max_time_s`` (its time
  limit); the server clamps both to its caps. The agent loop gets the time minus an answer reserve,
  the answer gets the reserve; when time runs out the agent still answers with what it found and
  ``finish_reason`` is ``time_limit``. A client that disconnects cancels its run, and with it the
  run's engine requests (non-streaming requests too: the connection is watched while the agent
  works).
- **No model code in this process.** The python tool runs in a sandbox server child with none of
  the gateway's secrets, which dies with the gateway, or on sandbox pods (``serving.sandbox``).
- **Errors in OpenAI's shape** (``{"error": {"message", "type", "param", "code"}}``, see
  ``serving.protocol``), so clients raise their usual exceptions; an engine failure is a 500 for
  that request and the server keeps serving the next one.
- **Operations.** ``/healthz`` answers as soon as the process serves HTTP; ``/readyz`` only once
  the engine is loaded (``flowlane serve`` binds the port first and loads the model in the
  background, so a Kubernetes probe can tell "starting" from "dead"), and no longer once the
  engine has died (vLLM's core process gone: every later request would fail, so the pod should be
  taken out of the Service and restarted); ``/metrics`` is Prometheus
  (``serving.metrics``). Optional bearer-token auth guards ``/v1/*``; probes and metrics stay open
  to the cluster.

Where each part lives: ``config`` (``GatewayConfig``), ``app`` (the ASGI app and its handlers,
``create_app``), ``admission`` (auth, body size, history cap, run slots), ``runs`` (one request's
agent run: budgets, errors, cancellation), ``streaming`` (the SSE body), ``protocol`` (the OpenAI
wire format). This module serves the app: ``running_gateway`` on loopback inside the caller's
event loop (the vLLM engine is bound to the loop it first ran in, so the server must share it) and
``serve``, the ``flowlane serve`` command. Heavy modules (torch, vLLM, the agent, the app) are
imported inside the functions that need them so that argument errors are reported at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowlane.api.errors import ConfigError, EngineUnavailableError, FlowlaneError
from flowlane.runtime.serving.config import PROMPT_RESERVE_TOKENS, GatewayConfig
from flowlane.runtime.serving.protocol import RequestLimits, StepDisplay

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

    from flowlane.runtime.agent.agent import AgentConfig
    from flowlane.runtime.tools.base import Tool

log = logging.getLogger(__name__)

DEFAULT_TOOLS = "python,search,generator"
DEFAULT_MODEL = "smollm2-135m-instruct"
SERVE_ENGINES = ("vllm", "transformers")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); a one-line error when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says IPPROTO_TCP, and accepted sockets copy the listener's. With
    # Nagle on, a response's body waited for the client's delayed ACK of its headers: ~40 ms on
    # every request (bench/serve.py's "gateway adds").
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app: Starlette, *, log_level: str, access_log: bool, handle_signals: bool) -> uvicorn.Server:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a caught SIGTERM after shutting down, which would kill the process
            # before the engine is closed; here a signal only asks the server to stop.
            if not handle_signals or threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="off",
                            timeout_graceful_shutdown=5)
    return Server(config)


@contextlib.asynccontextmanager
async def running_gateway(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` inside the current event loop; yields the base URL.

    The server shares the caller's loop, which is what an in-process vLLM engine needs (it is
    bound to the loop it first ran in). ``port=0`` picks a free port.
    """
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    server = _uvicorn_server(app, log_level="warning", access_log=False, handle_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the gateway server stopped during start-up")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{actual_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()


def default_served_name(model: str, model_dir: Path | str) -> str:
    """The model id clients use: a known name as given, else the checkpoint directory's name."""
    from flowlane.kit.models import KNOWN_MODELS

    return model.strip() if model.strip() in KNOWN_MODELS else str(model_dir).rstrip("/").rsplit("/", 1)[-1]


def serve(
    model: Annotated[str, typer.Option(
        help="A model directory, a known model name, a run's checkpoints/ directory (its latest) or a "
             "checkpoint URI (s3://bucket/run/step-NNNNNNNN).")] = DEFAULT_MODEL,
    engine: Annotated[str, typer.Option(help="LLM engine: vllm or transformers.")] = "vllm",
    fixed: Annotated[str | None, typer.Option(
        help="A frozen model for the executor, verifier and generator, on a second engine (a FlowRun's "
             "spec.model.fixed); default: the planner's model and engine.")] = None,
    dtype: Annotated[str, typer.Option(
        help="Weight dtype: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or float16.")] = "auto",
    tools: Annotated[str, typer.Option(help="Comma-separated tool names.")] = DEFAULT_TOOLS,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="FLOWLANE_API_KEY", help="Bearer token required on /v1/* (default: no auth).")] = None,
    max_turns: Annotated[int, typer.Option(help="Turn budget cap (and default) per request.")] = 10,
    min_turns: Annotated[int, typer.Option(
        help="Planner turns before the verifier is first asked to stop (a FlowRun's algorithm.minTurns); a "
             "request with a smaller max_turns gets that many.")] = 1,
    max_time_s: Annotated[float, typer.Option(help="Agent-loop wall-clock cap per request, seconds.")] = 120.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model id clients send (default: the model name, or the checkpoint directory's name).")] = None,
    max_content_chars: Annotated[int, typer.Option(
        help="Most message characters one request may send (all messages; the token cap trims history).")] = 64_000,
    max_concurrent_runs: Annotated[int, typer.Option(
        help="Agent runs in flight at once; a request over it gets 429 with Retry-After.")] = 64,
    history_max_tokens: Annotated[int, typer.Option(
        help="Tokens of the conversation (system message, earlier turns, question) in each module prompt; "
             "the oldest turns are dropped to fit.")] = 1024,
    max_model_len: Annotated[int, typer.Option(help="The vLLM engine's context length (tokens).")] = 4096,
    sandbox_address: Annotated[str | None, typer.Option(
        help="HOST:PORT of sandbox pods for the python tool (token: FLOWLANE_GRPC_TOKEN); default: a sandbox "
             "server child process without the gateway's secrets.")] = None,
    stream_steps: Annotated[str, typer.Option(
        help="Where streamed steps go besides the agentflow field: content, reasoning (reasoning_content) "
             "or none (the content is the answer alone).")] = "none",
    temperature: Annotated[float, typer.Option(help="Planner sampling temperature.")] = 0.0,
    log_level: Annotated[str, typer.Option(help="Log level: critical, error, warning, info, debug.")] = "info",
) -> None:
    """Serve an agent behind an OpenAI-compatible API (POST /v1/chat/completions)."""
    try:
        _serve(model=model, engine_kind=engine, fixed=fixed, dtype=dtype, tools=tools, host=host, port=port,
               api_key=api_key, max_turns=max_turns, min_turns=min_turns, max_time_s=max_time_s,
               served_model_name=served_model_name,
               max_content_chars=max_content_chars, max_concurrent_runs=max_concurrent_runs,
               history_max_tokens=history_max_tokens, max_model_len=max_model_len,
               sandbox_address=sandbox_address, stream_steps=stream_steps, temperature=temperature,
               log_level=log_level)
    except FlowlaneError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _serve(*, model: str, engine_kind: str, fixed: str | None, dtype: str, tools: str, host: str, port: int,
           api_key: str | None, max_turns: int, min_turns: int, max_time_s: float, served_model_name: str | None,
           max_content_chars: int, max_concurrent_runs: int, history_max_tokens: int, max_model_len: int,
           sandbox_address: str | None, stream_steps: str, temperature: float, log_level: str) -> None:
    from flowlane.kit.models import CHECKPOINT_SCHEMES, resolve_model
    from flowlane.runtime.agent.commands import parse_tool_list
    from flowlane.runtime.engines.base import resolve_dtype
    from flowlane.runtime.tools.registry import check_tool_names

    # Every cheap check first: a typo must not cost a model load.
    if engine_kind not in SERVE_ENGINES:
        raise ConfigError(f"unknown engine {engine_kind!r} for serving; choose one of: {', '.join(SERVE_ENGINES)}")
    tool_names = parse_tool_list(tools)
    check_tool_names(tool_names)
    try:
        steps = StepDisplay(stream_steps)
    except ValueError:
        raise ConfigError(f"--stream-steps must be one of {', '.join(d.value for d in StepDisplay)}, "
                          f"got {stream_steps!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    if max_turns < 1:
        raise ConfigError(f"--max-turns must be >= 1, got {max_turns}")
    if not 1 <= min_turns <= max_turns:
        raise ConfigError(f"--min-turns must be between 1 and --max-turns ({max_turns}), got {min_turns}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    if max_model_len < history_max_tokens + PROMPT_RESERVE_TOKENS:
        raise ConfigError(f"--history-max-tokens {history_max_tokens} does not fit --max-model-len {max_model_len}: "
                          f"module prompts need {PROMPT_RESERVE_TOKENS} more tokens; lower one or raise the other")
    if sandbox_address is not None:
        from flowlane.runtime.serving.sandbox import remote_runner

        remote_runner(sandbox_address)  # a bad address or a missing token fails before any model load
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    resolve_dtype(dtype)

    def local(name: str) -> str:
        """A local model now (a typo must fail fast); a checkpoint URI is fetched while probes answer."""
        return name.strip() if name.strip().startswith(CHECKPOINT_SCHEMES) else str(resolve_model(name))

    model_dir = local(model)
    fixed_dir = local(fixed) if fixed else None
    config = GatewayConfig(
        served_model_name=served_model_name or default_served_name(model, model_dir),
        api_key=api_key,
        limits=RequestLimits(max_content_chars=max_content_chars, max_turns=max_turns, max_time_s=max_time_s),
        max_concurrent_runs=max_concurrent_runs,
        history_max_tokens=history_max_tokens,
        steps=steps,
        agent=_agent_defaults(temperature, max_turns, min_turns),
    )
    sock = bind_socket(host, port)
    log_level = log_level.lower()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve_async(config, sock, engine_kind=engine_kind, model_dir=model_dir, fixed_dir=fixed_dir,
                                 dtype=dtype, tool_names=tool_names, log_level=log_level,
                                 max_model_len=max_model_len, sandbox_address=sandbox_address))
    finally:
        sock.close()


def _agent_defaults(temperature: float, max_turns: int = 10, min_turns: int = 1) -> AgentConfig:
    from flowlane.runtime.agent.agent import AgentConfig
    from flowlane.runtime.engines.base import SamplingSettings

    return AgentConfig(planner=SamplingSettings(max_tokens=256, temperature=temperature),
                       max_turns=max_turns, min_turns=min_turns)


async def _serve_async(config: GatewayConfig, sock: socket.socket, *, engine_kind: str, model_dir: str,
                       fixed_dir: str | None, dtype: str, tool_names: list[str], log_level: str,
                       max_model_len: int = 4096, sandbox_address: str | None = None) -> None:
    """Serve probes at once, load the engines in threads, then answer; close everything on exit."""
    from flowlane.runtime.engines.factory import close_engines, open_engines
    from flowlane.runtime.sandbox.server import RemoteCodeRunner
    from flowlane.runtime.serving.app import CHAT_PATH, Gateway
    from flowlane.runtime.serving.metrics import MeteredEngine
    from flowlane.runtime.serving.sandbox import SandboxChild, remote_runner
    from flowlane.runtime.tools.registry import ToolName, build_tools

    gateway = Gateway(config)
    server = _uvicorn_server(gateway.app(), log_level=log_level, access_log=True, handle_signals=True)
    host, port = sock.getsockname()[:2]
    options: dict[str, Any] = {"dtype": dtype}
    if engine_kind == "vllm":
        options["max_model_len"] = max_model_len
    loading = asyncio.create_task(open_engines(engine_kind, model_dir, fixed_dir, **options))
    served = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("listening on http://%s:%s; loading %s from %s", host, port, config.served_model_name, model_dir)
    tool_objects: list[Tool] = []
    # The python tool's code never runs here: a sandbox child without our secrets, or sandbox pods.
    runner: SandboxChild | RemoteCodeRunner | None = None
    if ToolName.PYTHON.value in tool_names:
        runner = remote_runner(sandbox_address) if sandbox_address else SandboxChild()
    try:
        if isinstance(runner, SandboxChild):
            await runner.start()
        await asyncio.wait({loading, served}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            try:
                planner, fixed = loading.result()
                fixed = MeteredEngine(fixed)  # the planner's engine is metered by attach
                tool_objects = build_tools(tool_names, engine=fixed, code_runner=runner)
                gateway.attach(planner, tool_objects, fixed=fixed)
            except Exception as err:
                gateway.engine_error = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise EngineUnavailableError(
                    f"the {engine_kind} engine for {model_dir} failed to start: {gateway.engine_error}") from None
            log.info("planner from %s; executor, verifier and generator on %s", model_dir,
                     f"a second engine with {fixed_dir}" if fixed_dir else "the planner's engine")
            log.info("ready: POST http://%s:%s%s with model %r", host, port, CHAT_PATH, config.served_model_name)
        await served
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await served
        with contextlib.suppress(Exception):
            await loading  # a signal during start-up: let the load finish, then close what it made
        for tool in tool_objects:
            with contextlib.suppress(Exception):
                await tool.close()
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.close()
        if loading.done() and not loading.cancelled() and loading.exception() is None:
            await close_engines(*loading.result())
