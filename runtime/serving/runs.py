"""One request's agent run: its budgets, its end in OpenAI's terms, its cancellation.

A request may ask for ``max_turns`` and ``max_time_s`` (its time limit), already clamped to the
server's caps by ``protocol.parse_chat_request``. ``agent_config`` splits the time: the agent loop
gets the time minus an answer reserve, the answer gets the reserve, so that when time runs out
the agent still answers with what it found (``finish_reason`` is ``time_limit``). A run that
ignores its limit (a hung tool, an engine that never answers) is given up after
``HARD_CEILING_MARGIN_S`` more with a 504.

``AgentRuns.run`` meters the run's token usage and turns every failure into an ``OpenAIError``:
a prompt over the model's context is a 400, an engine failure a 500 for that request alone (an
engine that is dead for good is reported to the gateway, whose ``/readyz`` then fails).
``run_watching`` cancels the run, and with it the run's engine requests, when the client
disconnects before the answer (``streaming.py`` does the same for streamed requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.runtime.serving.metrics import Usage, metering
from flowlane.runtime.serving.protocol import ChatRequest, ErrorCode, ErrorType, OpenAIError, usage_body

if TYPE_CHECKING:
    from starlette.requests import Request

    from flowlane.api.trajectory import Trajectory
    from flowlane.runtime.agent.agent import Agent, AgentConfig, EventCallback
    from flowlane.runtime.agent.conversation import Conversation
    from flowlane.runtime.serving.admission import RunSlots, Slot
    from flowlane.runtime.serving.config import GatewayConfig
    from flowlane.runtime.serving.metrics import GatewayMetrics

    AgentFactory = Callable[[AgentConfig], Agent]

log = logging.getLogger(__name__)

#: Past a request's own time limit, how long the gateway waits for a run that ignores it (a hung
#: tool, an engine that never answers) before giving up with a 504.
HARD_CEILING_MARGIN_S = 15.0
#: Share of a request's time kept for the answer, at most ``answer_reserve_s``.
ANSWER_SHARE = 1 / 3


def agent_config(config: GatewayConfig, chat: ChatRequest | None = None) -> AgentConfig:
    """The agent's budgets and sampling for ``chat`` (the server's defaults without one).

    The server's turn floor (``min_turns``) is clamped to the request's ``max_turns``.

    The request's time limit is split: the answer keeps ``answer_reserve_s`` (at most
    ``ANSWER_SHARE`` of it), the loop gets the rest.
    """
    from flowlane.runtime.agent.agent import AgentConfig  # the agent brings the tools and engines

    base = config.agent or AgentConfig()
    if chat is None:
        return dataclasses.replace(base, max_turns=1, min_turns=1, max_time_s=1.0)
    sampling: dict[str, Any] = {key: value for key, value in (("temperature", chat.temperature),
                                                              ("top_p", chat.top_p)) if value is not None}
    answer_s = min(config.answer_reserve_s, chat.max_time_s * ANSWER_SHARE)
    return dataclasses.replace(
        # the turn floor (``--min-turns``) never exceeds what the request asked for
        base, max_turns=chat.max_turns, min_turns=min(base.min_turns, chat.max_turns),
        max_time_s=chat.max_time_s - answer_s, answer_time_s=answer_s,
        planner=dataclasses.replace(base.planner, **sampling),
        generator_max_tokens=chat.answer_max_tokens or base.generator_max_tokens,
        generator_stop=chat.stop or base.generator_stop,
    )


class AgentRuns:
    """Runs agents built by ``factory`` for requests, within their budgets and slots."""

    def __init__(self, config: GatewayConfig, factory: AgentFactory, metrics: GatewayMetrics, slots: RunSlots,
                 on_engine_dead: Callable[[str], None]) -> None:
        self.config = config
        self.factory = factory
        self.metrics = metrics
        self.slots = slots
        self._on_engine_dead = on_engine_dead  # told why, when no later request can succeed

    async def run(self, chat: ChatRequest, conversation: Conversation, slot: Slot,
                  on_event: EventCallback | None = None) -> tuple[Trajectory, dict[str, int]]:
        """One agent run for ``chat`` in ``slot``, bounded by the request's budgets; (trajectory, usage)."""
        config = agent_config(self.config, chat)
        usage = Usage()
        ceiling_s = chat.max_time_s + HARD_CEILING_MARGIN_S
        started = time.monotonic()
        try:
            with metering(usage):
                async with asyncio.timeout(ceiling_s) as deadline:
                    traj = await self.factory(config).run(conversation, seed=chat.seed, on_event=on_event)
        except TimeoutError:
            if not deadline.expired():
                raise self.engine_error(TimeoutError("an engine call timed out")) from None
            raise OpenAIError(504, f"the agent did not finish within {ceiling_s:g} s, past its time limit; ask "
                              "for fewer turns (max_turns) or a shorter max_time_s",
                              type=ErrorType.TIMEOUT, code=ErrorCode.TIMEOUT) from None
        except OpenAIError:
            raise
        except ConfigError as err:  # e.g. the question makes a prompt longer than the model's context
            raise OpenAIError(400, f"the request cannot be served: {err}", code=ErrorCode.INVALID_VALUE) from None
        except Exception as err:
            raise self.engine_error(err) from err
        finally:
            slot.release()
        self.slots.note_run(time.monotonic() - started)
        if not usage.calls:  # a factory whose engine is not metered: count what the trajectory knows
            usage.completion_tokens = traj.generated_tokens
        self.metrics.observe_run(traj, usage.prompt_tokens, usage.completion_tokens)
        return traj, usage_body(usage.prompt_tokens, usage.completion_tokens)

    async def run_watching(self, request: Request, chat: ChatRequest, conversation: Conversation, slot: Slot
                           ) -> tuple[Trajectory, dict[str, int]]:
        """``run``, cancelled (with its engine requests) if the client disconnects meanwhile."""
        run = asyncio.create_task(self.run(chat, conversation, slot))
        gone = asyncio.create_task(disconnected(request))
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

    def engine_error(self, err: BaseException) -> OpenAIError:
        """The 500 for a failed run; a dead engine is reported so that /readyz fails from now on."""
        log.error("agent run failed", exc_info=err)
        first_line = (str(err).strip().splitlines() or ["no message"])[0]
        if engine_is_dead(err):  # no request can succeed any more: /readyz says so, the pod restarts
            self._on_engine_dead(f"{type(err).__name__}: {first_line}")
        return OpenAIError(500, f"the agent run failed ({type(err).__name__}: {first_line}); the server keeps "
                           "serving, retry or check the server log", type=ErrorType.SERVER,
                           code=ErrorCode.ENGINE_ERROR)


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_is_dead(err: BaseException) -> bool:
    """True for failures after which the engine serves nothing more (closed, or vLLM's core died)."""
    if isinstance(err, EngineUnavailableError):
        return True
    vllm_errors = sys.modules.get("vllm.v1.engine.exceptions")  # only when vLLM is in use
    dead = getattr(vllm_errors, "EngineDeadError", None)
    return isinstance(dead, type) and isinstance(err, dead)
