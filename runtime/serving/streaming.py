"""A streamed chat completion: the agent's steps as server-sent events, the moment they happen.

The body is a role chunk, one chunk per agent event (each step rendered when it happens, into the
``agentflow`` extension field and, by ``StepDisplay``, into ``content`` or ``reasoning_content``),
a last chunk with ``finish_reason`` and the run summary, a usage chunk when the client asked for
``stream_options.include_usage``, then ``[DONE]``. The run is a task of its own feeding a queue;
when the client goes away the body's generator is closed and the run cancelled, with its engine
requests. The 200 is sent before the run ends, so a failed run's error travels as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from flowlane.runtime.agent.agent import AgentEventKind
from flowlane.runtime.serving.protocol import (
    ChatRequest,
    OpenAIError,
    StepDisplay,
    answer_delta,
    chunk_body,
    event_record,
    event_text,
    finish_reason_of,
    run_summary,
    sse_event,
    step_delta,
    usage_chunk,
)

if TYPE_CHECKING:
    from flowlane.api.trajectory import Step, Trajectory
    from flowlane.runtime.agent.conversation import Conversation
    from flowlane.runtime.serving.admission import Slot
    from flowlane.runtime.serving.runs import AgentRuns


async def stream_run(runs: AgentRuns, chat: ChatRequest, conversation: Conversation, slot: Slot, *,
                     request_id: str, created: int, display: StepDisplay) -> AsyncIterator[bytes]:
    """The SSE body: a role chunk, one chunk per agent event as it happens, the summary, [DONE]."""

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

    task = asyncio.create_task(runs.run(chat, conversation, slot, on_event))
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
            runs.metrics.observe_error(err.code.value)
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
