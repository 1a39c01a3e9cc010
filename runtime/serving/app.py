"""The gateway's ASGI app: routes, the request handlers and the state they share.

``Gateway`` holds what outlives a request: the config, the agent runs (``runs.AgentRuns``, built
by ``attach`` around an engine or an agent factory), the run slots, readiness and the Prometheus
metrics. A chat request passes the admission checks (``admission.py``), then runs the agent once
(``runs.py``) and answers with one completion, or streams the run's steps (``streaming.py``).
Errors leave as OpenAI's ``{"error": {...}}`` bodies, Starlette's own 404/405 included.

``create_app`` builds the app around an engine that is already running (tests, benchmarks) or
any ``AgentFactory``; ``flowlane serve`` (``gateway.py``) builds it without one and attaches the
engine once it is loaded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flowlane.api.errors import ConfigError
from flowlane.runtime.agent.agent import Agent, AgentConfig
from flowlane.runtime.agent.conversation import TokenCounter, estimate_tokens
from flowlane.runtime.engines.base import LLMEngine
from flowlane.runtime.serving.admission import RunSlots, authorize, fit_history, not_ready_error, read_body
from flowlane.runtime.serving.config import PROMPT_RESERVE_TOKENS, GatewayConfig
from flowlane.runtime.serving.metrics import GatewayMetrics, MeteredEngine
from flowlane.runtime.serving.protocol import (
    ErrorCode,
    ErrorType,
    OpenAIError,
    StepDisplay,
    completion_body,
    error_body,
    finish_reason_of,
    model_card,
    models_body,
    parse_chat_request,
    run_summary,
    steps_text,
)
from flowlane.runtime.serving.runs import AgentRuns, agent_config
from flowlane.runtime.serving.streaming import stream_run

if TYPE_CHECKING:
    from flowlane.runtime.serving.runs import AgentFactory
    from flowlane.runtime.tools.base import Tool

CHAT_PATH = "/v1/chat/completions"
ENDPOINTS = (CHAT_PATH, "/v1/models", "/healthz", "/readyz", "/metrics")  # metric labels; the rest is "other"


class Gateway:
    """The request handlers and the state they share: the agent runs, readiness, metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.created = int(time.time())
        self.engine_error: str | None = None  # why the engine is unusable: it failed to load, or died
        self.slots = RunSlots(config.max_concurrent_runs, self.metrics)
        self._runs: AgentRuns | None = None
        self._count_tokens: TokenCounter = estimate_tokens

    @property
    def ready(self) -> bool:
        return self._runs is not None and self.engine_error is None

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
        source(agent_config(self.config))
        self._runs = AgentRuns(self.config, source, self.metrics, self.slots, self._engine_died)
        self.engine_error = None

    def _engine_died(self, reason: str) -> None:
        self.engine_error = reason

    # ------------------------------------------------------------------------------- the app

    def app(self) -> Starlette:
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
        authorize(request, self.config.api_key)
        raw = await read_body(request, self.config.max_body_bytes)
        chat = parse_chat_request(raw, self.config.limits)
        if chat.model != self.config.served_model_name:
            raise OpenAIError(404, f"model {chat.model!r} is not served here; this gateway serves "
                              f"{self.config.served_model_name!r} (see GET /v1/models)",
                              code=ErrorCode.MODEL_NOT_FOUND, param="model")
        runs = self._runs
        if runs is None or self.engine_error is not None:
            raise not_ready_error(self.engine_error)
        conversation = fit_history(chat.conversation, self.config.history_max_tokens, self._count_tokens)
        slot = self.slots.take()  # a 429 now, before a stream's 200 is sent
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        display = chat.steps or self.config.steps
        headers = {"x-request-id": request_id}
        if chat.stream:
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            # The background task frees the slot even if the client left before the body started.
            return StreamingResponse(stream_run(runs, chat, conversation, slot, request_id=request_id,
                                                created=created, display=display),
                                     media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(slot.release))
        traj, usage = await runs.run_watching(request, chat, conversation, slot)
        body = completion_body(
            request_id=request_id, created=created, model=chat.model, answer=traj.answer,
            agentflow=run_summary(traj, max_turns=chat.max_turns, conversation=conversation), usage=usage,
            reasoning=steps_text(traj) if display is StepDisplay.REASONING else None,
            finish_reason=finish_reason_of(traj),
        )
        return JSONResponse(body, headers=headers)

    async def list_models(self, request: Request) -> Response:
        authorize(request, self.config.api_key)
        return JSONResponse(models_body(self.config.served_model_name, self.created))

    async def get_model(self, request: Request) -> Response:
        authorize(request, self.config.api_key)
        model_id = request.path_params["model_id"]
        if model_id != self.config.served_model_name:
            raise OpenAIError(404, f"model {model_id!r} is not served here; this gateway serves "
                              f"{self.config.served_model_name!r}", code=ErrorCode.MODEL_NOT_FOUND, param="model")
        return JSONResponse(model_card(model_id, self.created))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready", "model": self.config.served_model_name})
        if self.engine_error is not None:
            return JSONResponse({"status": "failed", "error": self.engine_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ------------------------------------------------------------------------------- errors

    async def _api_error_response(self, request: Request, err: OpenAIError) -> Response:
        self.metrics.observe_error(err.code.value)
        headers = dict(err.headers)
        if err.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def _http_error_response(self, request: Request, err: Any) -> Response:
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


def token_counter(engine: LLMEngine) -> TokenCounter:
    """Counts text tokens with ``engine``'s tokenizer (through wrappers); an estimate without one."""
    tokenizer = _unwrapped_attribute(engine, "tokenizer")
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        return estimate_tokens

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    return count


def _unwrapped_attribute(engine: Any, name: str) -> Any:
    """``name`` of ``engine`` or of the first engine it wraps that has it (None if none does)."""
    while engine is not None:
        if name in getattr(engine, "__dict__", {}) or hasattr(type(engine), name):
            return getattr(engine, name)
        engine = getattr(engine, "inner", None)
    return None


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
