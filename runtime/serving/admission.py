"""What a chat request must pass before an agent runs for it, each failure an OpenAI-style error.

In the order the handler checks them: the bearer token (``authorize``, a 401), the body size
(``read_body``, a 413 as soon as the declared or streamed size is over the cap, without reading
the rest), the conversation's tokens (``fit_history``: the oldest turns dropped to fit, a 400 when
the system message and question alone do not) and a run slot (``RunSlots.take``: at
``max_concurrent_runs`` runs in flight, a 429 with ``Retry-After``). A slot is taken last, after
every check that can fail, and before a stream's 200 is sent.
"""

from __future__ import annotations

import hmac
import math
from typing import TYPE_CHECKING

from flowlane.runtime.agent.conversation import ConversationTooLong, TokenCounter, fit_conversation
from flowlane.runtime.serving.protocol import ErrorCode, ErrorType, OpenAIError

if TYPE_CHECKING:
    from starlette.requests import Request

    from flowlane.runtime.agent.conversation import Conversation
    from flowlane.runtime.serving.metrics import GatewayMetrics

#: Weight of the newest finished run in the moving average of run durations (for Retry-After).
RUN_TIME_SMOOTHING = 0.2


def authorize(request: Request, api_key: str | None) -> None:
    """Nothing without an API key configured; else a 401 unless ``Authorization: Bearer <api_key>``."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise OpenAIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                          type=ErrorType.INVALID_REQUEST, code=ErrorCode.INVALID_API_KEY)
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise OpenAIError(401, "incorrect API key provided; use the key this gateway was started with",
                          type=ErrorType.INVALID_REQUEST, code=ErrorCode.INVALID_API_KEY)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is known to be over ``limit`` bytes."""
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


def fit_history(conversation: Conversation, max_tokens: int, count: TokenCounter) -> Conversation:
    """The conversation inside ``max_tokens`` (oldest turns dropped), or a 400."""
    try:
        return fit_conversation(conversation, max_tokens, count)
    except ConversationTooLong as err:
        raise OpenAIError(400, f"{err}; this server's history cap is {err.max_tokens} tokens "
                          "(flowlane serve --history-max-tokens)",
                          code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, param="messages") from None


def not_ready_error(engine_error: str | None) -> OpenAIError:
    """The 503 for a request that arrives before the engine is loaded, or after it died."""
    detail = f"the engine is unusable ({engine_error}); restart the server" if engine_error else \
        "the engine is still loading; retry when GET /readyz answers 200"
    return OpenAIError(503, detail, type=ErrorType.SERVER, code=ErrorCode.NOT_READY)


class RunSlots:
    """``limit`` agent-run slots shared by all requests; past them a 429 saying when to retry."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.mean_run_s = 0.0  # moving average of finished runs' durations, for Retry-After
        self._metrics = metrics

    def take(self) -> Slot:
        if self.in_flight >= self.limit:
            # With every slot busy, a run ends about every mean_run_s / limit seconds.
            retry_after = max(1, math.ceil(self.mean_run_s / self.limit))
            raise OpenAIError(429, f"the server is running {self.limit} agent runs, its limit; retry in "
                              f"{retry_after} s", type=ErrorType.RATE_LIMIT, code=ErrorCode.RATE_LIMITED,
                              headers={"retry-after": str(retry_after)})
        self.in_flight += 1
        self._metrics.in_flight.inc()
        return Slot(self)

    def note_run(self, seconds: float) -> None:
        """A run finished after ``seconds``: the next Retry-After estimate follows it."""
        self.mean_run_s += RUN_TIME_SMOOTHING * (seconds - self.mean_run_s)

    def _freed(self) -> None:
        self.in_flight -= 1
        self._metrics.in_flight.dec()


class Slot:
    """One agent run's place under the limit; ``release`` may be called more than once."""

    def __init__(self, slots: RunSlots) -> None:
        self._slots: RunSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots._freed()
            self._slots = None
