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
  the gateway's secrets, or on sandbox pods (``serving.sandbox``).
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

``create_app`` builds the ASGI app around an engine that is already running (tests, benchmarks) or
any ``AgentFactory``; ``running_gateway`` serves an app on loopback inside the caller's event loop
(the vLLM engine is bound to the loop it first ran in, so the server must share it); ``serve`` is
the ``flowlane serve`` command. Heavy modules (torch, vLLM, the agent) are imported inside the
functions that need them so that argument errors are reported at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowlane.api.errors import ConfigError, EngineUnavailableError, FlowlaneError
from flowlane.runtime.serving.protocol import (
    ChatRequest,
    ErrorCode,
    ErrorType,
    OpenAIError,
    RequestLimits,
    StepDisplay,
    answer_delta,
    chunk_body,
    completion_body,
    error_body,
    event_record,
    event_text,
    finish_reason_of,
    model_card,
    models_body,
    parse_chat_request,
    run_summary,
    sse_event,
    step_delta,
    steps_text,
    usage_body,
    usage_chunk,
)

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from flowlane.runtime.agent.agent import Agent, AgentConfig, AgentEventKind
    from flowlane.runtime.agent.conversation import Conversation, TokenCounter
    from flowlane.runtime.engines.base import LLMEngine
    from flowlane.runtime.serving.metrics import GatewayMetrics
    from flowlane.runtime.tools.base import Tool
    from flowlane.runtime.trajectory import Step, Trajectory

    AgentFactory = Callable[[AgentConfig], Agent]

log = logging.getLogger(__name__)

DEFAULT_TOOLS = "python,search,generator"
DEFAULT_MODEL = "smollm2-135m-instruct"
SERVE_ENGINES = ("vllm", "transformers")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
CHAT_PATH = "/v1/chat/completions"
ENDPOINTS = (CHAT_PATH, "/v1/models", "/healthz", "/readyz", "/metrics")  # metric labels; the rest is "other"
#: Tokens of a module prompt besides the conversation: instructions, tool cards, worked examples,
#: a full memory (``memory_total_chars`` plus the newest step in full) and the longest output (the
#: planner's 256). The planner's prompt is the longest: ~1,500 tokens with the bundled tools and a
#: full memory of prose, ~2,050 when the memory is digits and code (a token every character or
#: two), measured with SmolLM2's tokenizer (tests/test_gateway.py checks this bound).
PROMPT_RESERVE_TOKENS = 2560
#: Past a request's own time limit, how long the gateway waits for a run that ignores it (a hung
#: tool, an engine that never answers) before giving up with a 504.
HARD_CEILING_MARGIN_S = 15.0
#: Share of a request's time kept for the answer, at most ``answer_reserve_s``.
ANSWER_SHARE = 1 / 3


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway serves and how much a request may use."""

    served_model_name: str
    api_key: str | None = None  # bearer token required on /v1/*; None: no auth
    limits: RequestLimits = field(default_factory=RequestLimits)
    answer_reserve_s: float = 30.0  # of a request's time, kept for the answer (at most ANSWER_SHARE of it)
    max_concurrent_runs: int = 64  # agent runs in flight; one more request gets a 429
    history_max_tokens: int = 1024  # the conversation's tokens in each module prompt; oldest turns dropped
    max_body_bytes: int = 1 << 20
    steps: StepDisplay = StepDisplay.NONE  # where streamed step text goes unless a request says
    agent: AgentConfig | None = None  # sampling and token budgets; turns and time are set per request

    def __post_init__(self) -> None:
        if not self.served_model_name.strip():
            raise ConfigError("served model name is empty; pass --served-model-name NAME")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; pass a non-empty --api-key or leave it out to disable auth")
        checks = {
            "max_turns": (self.limits.max_turns, 1),
            "max_content_chars": (self.limits.max_content_chars, 1),
            "max_messages": (self.limits.max_messages, 1),
            "max_concurrent_runs": (self.max_concurrent_runs, 1),
            "max_body_bytes": (self.max_body_bytes, 1024),
            "history_max_tokens": (self.history_max_tokens, 16),
            "max_answer_tokens": (self.limits.max_answer_tokens, 1),
        }
        for name, (value, least) in checks.items():
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if not self.limits.max_time_s > 0:
            raise ConfigError(f"max_time_s must be > 0, got {self.limits.max_time_s}")
        if not self.answer_reserve_s > 0:
            raise ConfigError(f"answer_reserve_s must be > 0, got {self.answer_reserve_s}")


class Gateway:
    """The request handlers and the state they share: the agent factory, readiness, metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        from flowlane.runtime.serving.metrics import GatewayMetrics

        self.config = config
        self.metrics: GatewayMetrics = GatewayMetrics()
        self.created = int(time.time())
        self.engine_error: str | None = None  # why the engine is unusable: it failed to load, or died
        self._factory: AgentFactory | None = None
        self._count_tokens: TokenCounter | None = None
        self.runs_in_flight = 0
        self._mean_run_s = 0.0  # moving average of finished runs' durations, for Retry-After

    @property
    def ready(self) -> bool:
        return self._factory is not None and self.engine_error is None

    def attach(self, source: LLMEngine | AgentFactory, tools: Sequence[Tool] = (),
               fixed: LLMEngine | None = None) -> None:
        """Start answering with ``source``: the planner's engine or an agent factory.

        With an engine, ``fixed`` runs the executor, verifier and generator (default: the
        planner's engine). Engines are wrapped in ``MeteredEngine`` so responses report token
        usage; build the tools on the same metered fixed engine to count the generator tool's
        tokens too. One agent is built at once so that a bad tool list fails here, not on the
        first request. Conversations are counted with the engine's tokenizer (an agent factory's
        with an estimate), and ``history_max_tokens`` must leave room for the module prompts
        inside the engine's ``max_model_len``.
        """
        from flowlane.runtime.agent.agent import Agent
        from flowlane.runtime.agent.conversation import estimate_tokens
        from flowlane.runtime.engines.base import LLMEngine
        from flowlane.runtime.serving.metrics import MeteredEngine

        self._count_tokens = estimate_tokens
        if isinstance(source, LLMEngine):
            self._count_tokens = token_counter(source)
            for engine in {id(e): e for e in (source, fixed or source)}.values():
                max_model_len = _unwrapped_attribute(engine, "max_model_len")
                if isinstance(max_model_len, int) and \
                        self.config.history_max_tokens + PROMPT_RESERVE_TOKENS > max_model_len:
                    raise ConfigError(
                        f"history_max_tokens {self.config.history_max_tokens} does not fit the engine's "
                        f"max_model_len {max_model_len} (module prompts need {PROMPT_RESERVE_TOKENS} more); use "
                        f"--history-max-tokens {max(16, max_model_len - PROMPT_RESERVE_TOKENS)} or less")

            def metered(engine: LLMEngine) -> LLMEngine:
                return engine if isinstance(engine, MeteredEngine) else MeteredEngine(engine)

            planner = metered(source)
            frozen = planner if fixed is None or fixed is source else metered(fixed)
            tool_list = list(tools)

            def factory(config: AgentConfig) -> Agent:
                return Agent(planner, frozen, tool_list, config)

            source = factory
        source(self._agent_config())
        self._factory = source
        self.engine_error = None

    # ------------------------------------------------------------------------------- the app

    def app(self) -> Starlette:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [
            Route(CHAT_PATH, self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={
            OpenAIError: self._api_error_response,  # type: ignore[dict-item]  # starlette types handlers for any Exception
            HTTPException: self._http_error_response,
        })
        app.add_middleware(_RequestMetrics, metrics=self.metrics)
        app.state.gateway = self
        return app

    async def chat_completions(self, request: Request) -> Response:
        from starlette.responses import JSONResponse, StreamingResponse

        self._authorize(request)
        raw = await self._read_body(request)
        chat = parse_chat_request(raw, self.config.limits)
        if chat.model != self.config.served_model_name:
            raise OpenAIError(404, f"model {chat.model!r} is not served here; this gateway serves "
                           f"{self.config.served_model_name!r} (see GET /v1/models)",
                           code=ErrorCode.MODEL_NOT_FOUND, param="model")
        if not self.ready:
            raise self._not_ready_error()
        conversation = self._fit(chat.conversation)
        slot = self._take_slot()  # a 429 now, before a stream's 200 is sent
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        display = chat.steps or self.config.steps
        headers = {"x-request-id": request_id}
        if chat.stream:
            from starlette.background import BackgroundTask

            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            # The background task frees the slot even if the client left before the body started.
            return StreamingResponse(self._stream(chat, conversation, slot, request_id, created, display),
                                     media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(slot.release))
        traj, usage = await self._run_watching(request, chat, conversation, slot)
        body = completion_body(
            request_id=request_id, created=created, model=chat.model, answer=traj.answer,
            agentflow=run_summary(traj, max_turns=chat.max_turns, conversation=conversation), usage=usage,
            reasoning=steps_text(traj) if display is StepDisplay.REASONING else None,
            finish_reason=finish_reason_of(traj),
        )
        return JSONResponse(body, headers=headers)

    async def list_models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        self._authorize(request)
        return JSONResponse(models_body(self.config.served_model_name, self.created))

    async def get_model(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != self.config.served_model_name:
            raise OpenAIError(404, f"model {model_id!r} is not served here; this gateway serves "
                           f"{self.config.served_model_name!r}", code=ErrorCode.MODEL_NOT_FOUND, param="model")
        return JSONResponse(model_card(model_id, self.created))

    async def healthz(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        if self.ready:
            return JSONResponse({"status": "ready", "model": self.config.served_model_name})
        if self.engine_error is not None:
            return JSONResponse({"status": "failed", "error": self.engine_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics_endpoint(self, request: Request) -> Response:
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ------------------------------------------------------------------------------- running

    def _fit(self, conversation: Conversation) -> Conversation:
        """The conversation inside ``history_max_tokens`` (oldest turns dropped), or a 400."""
        from flowlane.runtime.agent.conversation import ConversationTooLong, estimate_tokens, fit_conversation

        try:
            return fit_conversation(conversation, self.config.history_max_tokens,
                                    self._count_tokens or estimate_tokens)
        except ConversationTooLong as err:
            raise OpenAIError(400, f"{err}; this server's history cap is {err.max_tokens} tokens "
                           "(flowlane serve --history-max-tokens)",
                           code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, param="messages") from None

    def _take_slot(self) -> _Slot:
        """One of ``max_concurrent_runs`` agent-run slots, or a 429 saying when to retry."""
        limit = self.config.max_concurrent_runs
        if self.runs_in_flight >= limit:
            # With every slot busy, a run ends about every mean_run_s / limit seconds.
            retry_after = max(1, math.ceil(self._mean_run_s / limit))
            raise OpenAIError(429, f"the server is running {limit} agent runs, its limit; retry in {retry_after} s",
                           type=ErrorType.RATE_LIMIT, code=ErrorCode.RATE_LIMITED,
                           headers={"retry-after": str(retry_after)})
        self.runs_in_flight += 1
        self.metrics.in_flight.inc()
        return _Slot(self)

    def _slot_freed(self) -> None:
        self.runs_in_flight -= 1
        self.metrics.in_flight.dec()

    async def _run_watching(self, request: Request, chat: ChatRequest, conversation: Conversation, slot: _Slot
                            ) -> tuple[Trajectory, dict[str, int]]:
        """``_run``, cancelled (with its engine requests) if the client disconnects meanwhile."""
        run = asyncio.create_task(self._run(chat, conversation, slot))
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (run, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(BaseException):
                await gone
        if run.cancelled() or not run.done():
            with contextlib.suppress(BaseException):
                await run
            raise OpenAIError(499, "the client closed the connection; the agent run was cancelled",
                           code=ErrorCode.CLIENT_CLOSED)
        return run.result()

    async def _run(self, chat: ChatRequest, conversation: Conversation, slot: _Slot,
                   on_event: Callable[..., None] | None = None) -> tuple[Trajectory, dict[str, int]]:
        """One agent run for ``chat`` in ``slot``, bounded by the request's budgets; (trajectory, usage)."""
        from flowlane.runtime.serving.metrics import Usage, metering

        assert self._factory is not None
        config = self._agent_config(chat)
        usage = Usage()
        ceiling_s = chat.max_time_s + HARD_CEILING_MARGIN_S
        started = time.monotonic()
        try:
            with metering(usage):
                async with asyncio.timeout(ceiling_s) as deadline:
                    traj = await self._factory(config).run(conversation, seed=chat.seed, on_event=on_event)
        except TimeoutError:
            if not deadline.expired():
                raise self._engine_error(TimeoutError("an engine call timed out")) from None
            raise OpenAIError(504, f"the agent did not finish within {ceiling_s:g} s, past its time limit; ask "
                           "for fewer turns (max_turns) or a shorter max_time_s",
                           type=ErrorType.TIMEOUT, code=ErrorCode.TIMEOUT) from None
        except OpenAIError:
            raise
        except ConfigError as err:  # e.g. the question makes a prompt longer than the model's context
            raise OpenAIError(400, f"the request cannot be served: {err}", code=ErrorCode.INVALID_VALUE) from None
        except Exception as err:
            raise self._engine_error(err) from err
        finally:
            slot.release()
        self._mean_run_s += 0.2 * ((time.monotonic() - started) - self._mean_run_s)
        if not usage.calls:  # a factory whose engine is not metered: count what the trajectory knows
            usage.completion_tokens = traj.generated_tokens
        self.metrics.observe_run(traj, usage.prompt_tokens, usage.completion_tokens)
        return traj, usage_body(usage.prompt_tokens, usage.completion_tokens)

    async def _stream(self, chat: ChatRequest, conversation: Conversation, slot: _Slot, request_id: str,
                      created: int, display: StepDisplay) -> AsyncIterator[bytes]:
        """The SSE body: a role chunk, one chunk per agent event as it happens, the summary, [DONE]."""
        from flowlane.runtime.agent.agent import AgentEventKind

        def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
            return chunk_body(request_id=request_id, created=created, model=chat.model, delta=delta, **extra)

        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def on_event(kind: AgentEventKind, traj: Trajectory, step: Step | None) -> None:
            # Rendered now: the step object keeps changing after the event.
            if kind is AgentEventKind.ANSWER:
                delta = answer_delta(display, traj.answer)
            else:
                text = event_text(kind.value, traj, step)
                delta = step_delta(display, text) if text else {}
            queue.put_nowait(chunk(delta, agentflow=event_record(kind.value, traj, step)))

        task = asyncio.create_task(self._run(chat, conversation, slot, on_event))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            yield sse_event(chunk({"role": "assistant", "content": ""}))
            while (item := await queue.get()) is not None:
                yield sse_event(item)
            try:
                traj, usage = task.result()
            except OpenAIError as err:
                # The 200 status is already sent: the error travels as an event, which OpenAI
                # clients raise as an APIError.
                self.metrics.observe_error(err.code.value)
                yield sse_event(err.body())
                yield sse_event("[DONE]")
                return
            summary = run_summary(traj, max_turns=chat.max_turns, conversation=conversation)
            yield sse_event(chunk({}, finish_reason=finish_reason_of(traj).value, agentflow=summary))
            if chat.include_usage:
                yield sse_event(usage_chunk(request_id=request_id, created=created, model=chat.model, usage=usage))
            yield sse_event("[DONE]")
        finally:
            if not task.done():  # the client went away: stop spending the engine on this run
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            slot.release()

    def _agent_config(self, chat: ChatRequest | None = None) -> AgentConfig:
        """The agent's budgets and sampling for ``chat`` (the server's defaults without one).

        The request's time limit is split: the answer keeps ``answer_reserve_s`` (at most
        ``ANSWER_SHARE`` of it), the loop gets the rest.
        """
        from flowlane.runtime.agent.agent import AgentConfig

        base = self.config.agent or AgentConfig()
        if chat is None:
            return dataclasses.replace(base, max_turns=1, max_time_s=1.0)
        sampling: dict[str, Any] = {key: value for key, value in (("temperature", chat.temperature),
                                                                  ("top_p", chat.top_p)) if value is not None}
        answer_s = min(self.config.answer_reserve_s, chat.max_time_s * ANSWER_SHARE)
        return dataclasses.replace(
            base, max_turns=chat.max_turns, max_time_s=chat.max_time_s - answer_s, answer_time_s=answer_s,
            planner=dataclasses.replace(base.planner, **sampling),
            generator_max_tokens=chat.answer_max_tokens or base.generator_max_tokens,
            generator_stop=chat.stop or base.generator_stop,
        )

    # ------------------------------------------------------------------------------- checks

    def _authorize(self, request: Request) -> None:
        expected = self.config.api_key
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           type=ErrorType.INVALID_REQUEST, code=ErrorCode.INVALID_API_KEY)
        if not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise OpenAIError(401, "incorrect API key provided; use the key this gateway was started with",
                           type=ErrorType.INVALID_REQUEST, code=ErrorCode.INVALID_API_KEY)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = OpenAIError(413, f"the request body is larger than {limit} bytes; shorten the messages",
                             code=ErrorCode.BODY_TOO_LARGE)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            chunks.append(part)
        return b"".join(chunks)

    def _not_ready_error(self) -> OpenAIError:
        detail = f"the engine is unusable ({self.engine_error}); restart the server" if self.engine_error else \
            "the engine is still loading; retry when GET /readyz answers 200"
        return OpenAIError(503, detail, type=ErrorType.SERVER, code=ErrorCode.NOT_READY)

    def _engine_error(self, err: BaseException) -> OpenAIError:
        log.error("agent run failed", exc_info=err)
        first_line = (str(err).strip().splitlines() or ["no message"])[0]
        if _engine_is_dead(err):  # no request can succeed any more: /readyz says so, the pod restarts
            self.engine_error = f"{type(err).__name__}: {first_line}"
        return OpenAIError(500, f"the agent run failed ({type(err).__name__}: {first_line}); the server keeps "
                        "serving, retry or check the server log", type=ErrorType.SERVER, code=ErrorCode.ENGINE_ERROR)

    async def _api_error_response(self, request: Request, err: OpenAIError) -> Response:
        from starlette.responses import JSONResponse

        self.metrics.observe_error(err.code.value)
        headers = dict(err.headers)
        if err.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def _http_error_response(self, request: Request, err: Any) -> Response:
        from starlette.responses import JSONResponse

        status = int(err.status_code)
        if status == 404:
            body = error_body(f"no route {request.method} {request.url.path}; the API is under /v1",
                              ErrorType.INVALID_REQUEST, ErrorCode.NOT_FOUND)
        elif status == 405:
            body = error_body(f"{request.method} is not allowed on {request.url.path}",
                              ErrorType.INVALID_REQUEST, ErrorCode.METHOD_NOT_ALLOWED)
        else:
            body = error_body(str(err.detail), ErrorType.INVALID_REQUEST, ErrorCode.INVALID_VALUE)
        self.metrics.observe_error(body["error"]["code"])
        return JSONResponse(body, status_code=status, headers=getattr(err, "headers", None))


class _Slot:
    """One agent run's place under ``max_concurrent_runs``; ``release`` may be called more than once."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway: Gateway | None = gateway

    def release(self) -> None:
        if self._gateway is not None:
            self._gateway._slot_freed()
            self._gateway = None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _unwrapped_attribute(engine: Any, name: str) -> Any:
    """``name`` of ``engine`` or of the first engine it wraps that has it (None if none does)."""
    while engine is not None:
        if name in getattr(engine, "__dict__", {}) or hasattr(type(engine), name):
            return getattr(engine, name)
        engine = getattr(engine, "inner", None)
    return None


def token_counter(engine: LLMEngine) -> TokenCounter:
    """Counts text tokens with ``engine``'s tokenizer (through wrappers); an estimate without one."""
    from flowlane.runtime.agent.conversation import estimate_tokens

    tokenizer = _unwrapped_attribute(engine, "tokenizer")
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        return estimate_tokens

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    return count


def _engine_is_dead(err: BaseException) -> bool:
    """True for failures after which the engine serves nothing more (closed, or vLLM's core died)."""
    if isinstance(err, EngineUnavailableError):
        return True
    vllm_errors = sys.modules.get("vllm.v1.engine.exceptions")  # only when vLLM is in use
    dead = getattr(vllm_errors, "EngineDeadError", None)
    return isinstance(dead, type) and isinstance(err, dead)


class _RequestMetrics:
    """ASGI middleware: count every HTTP request by endpoint and status, time it to its last byte."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = 500
        started = time.monotonic()

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe_request(endpoint, status, time.monotonic() - started)


def create_app(
    source: LLMEngine | AgentFactory | None,
    tools: Sequence[Tool] = (),
    *,
    config: GatewayConfig,
) -> Starlette:
    """The ASGI app serving ``source`` (an engine already running, or an agent factory).

    With ``source=None`` the app serves probes at once and answers chat requests with 503 until
    ``app.state.gateway.attach(...)`` is called (``flowlane serve`` loads the engine meanwhile).
    """
    gateway = Gateway(config)
    if source is not None:
        gateway.attach(source, tools)
    return gateway.app()


# ----------------------------------------------------------------------------------- serving


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); a one-line error when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    from flowlane.runtime.models import KNOWN_MODELS

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
               api_key=api_key, max_turns=max_turns, max_time_s=max_time_s, served_model_name=served_model_name,
               max_content_chars=max_content_chars, max_concurrent_runs=max_concurrent_runs,
               history_max_tokens=history_max_tokens, max_model_len=max_model_len,
               sandbox_address=sandbox_address, stream_steps=stream_steps, temperature=temperature,
               log_level=log_level)
    except FlowlaneError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _serve(*, model: str, engine_kind: str, fixed: str | None, dtype: str, tools: str, host: str, port: int,
           api_key: str | None, max_turns: int, max_time_s: float, served_model_name: str | None,
           max_content_chars: int, max_concurrent_runs: int, history_max_tokens: int, max_model_len: int,
           sandbox_address: str | None, stream_steps: str, temperature: float, log_level: str) -> None:
    from flowlane.runtime.agent.commands import parse_tool_list
    from flowlane.runtime.engines.base import resolve_dtype
    from flowlane.runtime.models import CHECKPOINT_SCHEMES, resolve_model
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
        agent=_agent_defaults(temperature),
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


def _agent_defaults(temperature: float) -> AgentConfig:
    from flowlane.runtime.agent.agent import AgentConfig
    from flowlane.runtime.engines.base import SamplingSettings

    return AgentConfig(planner=SamplingSettings(max_tokens=256, temperature=temperature))


async def _serve_async(config: GatewayConfig, sock: socket.socket, *, engine_kind: str, model_dir: str,
                       fixed_dir: str | None, dtype: str, tool_names: list[str], log_level: str,
                       max_model_len: int = 4096, sandbox_address: str | None = None) -> None:
    """Serve probes at once, load the engines in threads, then answer; close everything on exit."""
    from flowlane.runtime.engines.factory import close_engines, open_engines
    from flowlane.runtime.sandbox.server import RemoteCodeRunner
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
