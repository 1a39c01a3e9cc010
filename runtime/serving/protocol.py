"""The OpenAI chat-completions wire format, as the serving gateway speaks it (pure functions).

Existing clients (the official ``openai`` SDKs, LangChain, chat UIs) already know how to call
``POST /v1/chat/completions``. The gateway answers in that format, but behind each request runs a
whole AgentFlow trajectory instead of one generation. This module is the translation, kept free of
I/O so that it can be read and tested on its own:

- **Requests in.** ``parse_chat_request`` turns a raw body into a ``ChatRequest`` or raises an
  ``OpenAIError`` carrying the HTTP status and the OpenAI error body (``{"error": {"message", "type",
  "param", "code"}}``) that clients turn into ``BadRequestError``, ``NotFoundError``, ... The agent
  answers the **last user message** inside the whole conversation: earlier user/assistant turns
  and system/developer messages become a ``Conversation`` (``runtime/agent/conversation.py``).
  ``tool``/``function`` messages and assistant tool calls are refused: the agent runs its own
  tools, the server's, and has no client-side tool results to read.
- **Answers out.** The message content is the agent's final answer, so a plain client sees a
  normal completion; the steps it took (tool, sub-goal, command, result, verdict) travel in an
  extra top-level ``agentflow`` field, which OpenAI clients keep (their models allow extra
  fields). ``finish_reason`` is ``stop``, ``length`` (the answer reached ``max_tokens``) or
  ``time_limit`` (the request's time ran out; the answer is what the agent had by then).
- **Steps while they happen.** A streamed response is a series of ``chat.completion.chunk`` server-
  sent events: every agent event is a chunk whose structured ``agentflow`` field holds the step
  (and, if the request or server asks, a readable text delta in ``content`` or in
  ``reasoning_content``, the field chat UIs show as "thinking"); then the answer, a final chunk
  with the run summary, the usage chunk for ``stream_options.include_usage``, and ``[DONE]``.

Every OpenAI field is honoured or refused, never silently ignored (``REFUSED_FIELDS`` says why
each refused one cannot apply to an agent): ``temperature`` and ``top_p`` set the planner's
sampling, ``seed`` seeds every module call of the run, ``max_tokens`` / ``max_completion_tokens``
bound the final answer and ``stop`` ends it. ``user``, ``metadata``, ``store``, ``service_tier``
and ``parallel_tool_calls`` change no output and are accepted. Request fields beyond OpenAI's,
all optional: ``max_turns`` and ``max_time_s`` (the agent's turn budget and the whole request's
time limit, clamped to the server's caps) and ``agentflow_steps`` (a ``StepDisplay``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from flowlane.runtime.agent.conversation import ChatTurn, Conversation, Speaker

if TYPE_CHECKING:
    from flowlane.api.trajectory import Step, Trajectory

RESULT_PREVIEW_CHARS = 600  # tool results in the readable stream text; the structured field is complete
INSTRUCTION_ROLES = frozenset({"system", "developer"})
ROLES = frozenset({*INSTRUCTION_ROLES, "user", "assistant"})
TOOL_ROLES = frozenset({"tool", "function"})  # known to OpenAI, refused here (see module docstring)
MAX_STOP_SEQUENCES = 4  # OpenAI's limit

#: OpenAI fields that cannot apply to an agent run, with why; refused unless they hold a value that
#: asks for nothing (``NEUTRAL_VALUES``).
REFUSED_FIELDS: dict[str, str] = {
    "tools": "the agent calls its own tools (the server's tool list), not the client's",
    "tool_choice": "the agent calls its own tools (the server's tool list), not the client's",
    "functions": "the agent calls its own tools (the server's tool list), not the client's",
    "function_call": "the agent calls its own tools (the server's tool list), not the client's",
    "response_format": "the answer is free text written from the agent's steps",
    "logprobs": "an answer comes from several generations, so there are no per-token log-probs to return",
    "top_logprobs": "an answer comes from several generations, so there are no per-token log-probs to return",
    "logit_bias": "token biases would apply to every module's generation, not just the answer",
    "presence_penalty": "penalties would apply to every module's generation, not just the answer",
    "frequency_penalty": "penalties would apply to every module's generation, not just the answer",
    "prediction": "predicted outputs do not apply to an agent's answer",
    "audio": "only text is supported",
    "modalities": "only text is supported",
    "web_search_options": "web search is a server-side tool (FlowService spec.tools)",
    "reasoning_effort": "the agent's effort is its turn budget: send max_turns",
}
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logprobs": (False,), "logit_bias": ({},),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "modalities": (["text"],),
}
#: Fields that change no output, accepted as OpenAI clients send them.
NO_EFFECT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
KNOWN_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "seed", "stop",
    "max_tokens", "max_completion_tokens", "max_turns", "max_time_s", "agentflow_steps",
    *NO_EFFECT_FIELDS, *REFUSED_FIELDS,
})


class ErrorType(StrEnum):
    """The ``error.type`` values OpenAI clients know."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"
    TIMEOUT = "timeout_error"


class ErrorCode(StrEnum):
    """``error.code``: the machine-readable reason, one per way a request can fail."""

    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    MISSING_MESSAGES = "missing_messages"
    NO_USER_MESSAGE = "no_user_message"
    EMPTY_CONTENT = "empty_content"
    CONTENT_TOO_LONG = "content_too_long"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt that cannot fit
    UNKNOWN_PARAMETER = "unknown_parameter"
    RATE_LIMITED = "rate_limit_exceeded"
    CLIENT_CLOSED = "client_closed_request"
    BODY_TOO_LARGE = "request_too_large"
    UNSUPPORTED = "unsupported_parameter"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_READY = "not_ready"
    ENGINE_ERROR = "engine_error"
    TIMEOUT = "timeout"


class StepDisplay(StrEnum):
    """Where a streamed response puts the readable step text."""

    CONTENT = "content"  # in the message content, before the answer: every client shows it
    REASONING = "reasoning"  # in ``reasoning_content``: chat UIs show it apart from the answer
    NONE = "none"  # only the structured ``agentflow`` field: the content is the answer alone


class FinishReason(StrEnum):
    """``choices[0].finish_reason`` of a served answer."""

    STOP = "stop"  # the agent finished and wrote its answer
    LENGTH = "length"  # the answer reached the request's max_tokens
    TIME_LIMIT = "time_limit"  # the request's time ran out: the answer is partial (agentflow.stop_reason)


def finish_reason_of(traj: Trajectory) -> FinishReason:
    from flowlane.api.trajectory import StopReason

    if traj.stop_reason is StopReason.TIME_BUDGET:
        return FinishReason.TIME_LIMIT
    return FinishReason.LENGTH if traj.answer_finish_reason == "length" else FinishReason.STOP


class OpenAIError(Exception):
    """A request that cannot be served, with its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: ErrorType = ErrorType.INVALID_REQUEST,
                 code: ErrorCode, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: ErrorType, code: ErrorCode, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type.value, "param": param, "code": code.value}}


def bad_request(message: str, code: ErrorCode = ErrorCode.INVALID_VALUE, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, code=code, param=param)


# ------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; the server's caps."""

    max_content_chars: int = 64_000  # all message text together (history beyond the token cap is dropped)
    max_messages: int = 64
    max_turns: int = 10  # requests asking for more turns get this many
    max_time_s: float = 120.0  # the request's time limit; requests asking for longer get this long
    max_answer_tokens: int = 1024  # requests asking for a longer answer (max_tokens) get this many


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request, reduced to what the agent needs."""

    model: str
    conversation: Conversation
    stream: bool = False
    include_usage: bool = False
    max_turns: int = 10
    max_time_s: float = 120.0
    temperature: float | None = None  # planner sampling; None keeps the server's setting
    top_p: float | None = None  # planner sampling; None keeps the server's setting
    seed: int | None = None
    answer_max_tokens: int | None = None  # max_tokens / max_completion_tokens; None: the server's
    stop: tuple[str, ...] = ()  # the answer ends at the first of these
    steps: StepDisplay | None = None  # None: the server's default

    @property
    def question(self) -> str:
        return self.conversation.question


def parse_chat_request(raw: bytes, limits: RequestLimits) -> ChatRequest:
    """The request in ``raw`` (a JSON body), checked; ``OpenAIError`` (400) naming the first problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise bad_request(f"the request body is not valid JSON ({err}); send a JSON object",
                          ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          ErrorCode.INVALID_JSON)
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required: name the served model (see GET /v1/models)", param="model")
    conversation = conversation_from(body.get("messages"), limits)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (one agent run per request), got {n!r}", ErrorCode.UNSUPPORTED, "n")
    stream = _optional(body, "stream", bool) or False
    options = _optional(body, "stream_options", dict)
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed with \"stream\": true", param="stream_options")
    include_usage = _optional(options or {}, "include_usage", bool) or False
    max_turns = _optional(body, "max_turns", int)
    if max_turns is not None and max_turns < 1:
        raise bad_request(f"'max_turns' must be >= 1, got {max_turns}", param="max_turns")
    max_time_s = _optional(body, "max_time_s", float)
    if max_time_s is not None and not (max_time_s > 0 and math.isfinite(max_time_s)):
        raise bad_request(f"'max_time_s' must be a positive number of seconds, got {max_time_s}", param="max_time_s")
    temperature = _optional(body, "temperature", float)
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise bad_request(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = _optional(body, "top_p", float)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"'top_p' must be > 0 and <= 1, got {top_p}", param="top_p")
    steps_text = _optional(body, "agentflow_steps", str)
    steps = None
    if steps_text is not None:
        try:
            steps = StepDisplay(steps_text)
        except ValueError:
            choices = ", ".join(d.value for d in StepDisplay)
            raise bad_request(f"'agentflow_steps' must be one of {choices}, got {steps_text!r}",
                              param="agentflow_steps") from None
    answer_max_tokens = _answer_max_tokens(body)
    return ChatRequest(
        model=model.strip(),
        conversation=conversation,
        stream=stream,
        include_usage=include_usage,
        max_turns=min(max_turns or limits.max_turns, limits.max_turns),
        max_time_s=min(max_time_s or limits.max_time_s, limits.max_time_s),
        temperature=temperature,
        top_p=top_p,
        seed=_optional(body, "seed", int),
        answer_max_tokens=None if answer_max_tokens is None else min(answer_max_tokens, limits.max_answer_tokens),
        stop=_stop_sequences(body.get("stop")),
        steps=steps,
    )


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse fields this server does not know, and OpenAI fields that cannot apply to an agent."""
    unknown = sorted(key for key in body if key not in KNOWN_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized request argument {unknown[0]!r}; this server accepts: "
                          f"{', '.join(sorted(KNOWN_FIELDS - set(REFUSED_FIELDS)))}",
                          ErrorCode.UNKNOWN_PARAMETER, unknown[0])
    for key, why in REFUSED_FIELDS.items():
        value = body.get(key)
        if value is not None and value not in NEUTRAL_VALUES.get(key, ()):
            raise bad_request(f"'{key}' is not supported: {why}; remove it", ErrorCode.UNSUPPORTED, key)


def _answer_max_tokens(body: dict[str, Any]) -> int | None:
    values = {key: _optional(body, key, int) for key in ("max_completion_tokens", "max_tokens")}
    given = {key: value for key, value in values.items() if value is not None}
    for key, value in given.items():
        if value < 1:
            raise bad_request(f"'{key}' must be >= 1, got {value}", param=key)
    if len(set(given.values())) > 1:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send only max_completion_tokens",
                          param="max_tokens")
    return next(iter(given.values()), None)


def _stop_sequences(stop: Any) -> tuple[str, ...]:
    """``stop`` as a tuple: null, a string, or a list of up to ``MAX_STOP_SEQUENCES`` strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' has {len(items)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                          param="stop")
    return tuple(items)


def conversation_from(messages: Any, limits: RequestLimits) -> Conversation:
    """The conversation in ``messages``: instructions, earlier turns, the last user message.

    Checks every message's shape and the size cap; the token cap is applied later, where the
    tokenizer is (``conversation.fit_conversation``).
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required: a non-empty list of {role, content} objects",
                          ErrorCode.MISSING_MESSAGES, "messages")
    if len(messages) > limits.max_messages:
        raise bad_request(f"'messages' has {len(messages)} entries; this server accepts at most "
                          f"{limits.max_messages}", ErrorCode.CONTENT_TOO_LONG, "messages")
    texts: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role in TOOL_ROLES:
            raise bad_request(f"{where}: {role} messages are not supported: the agent runs its own tools and "
                              f"reads their results itself; send only {', '.join(sorted(ROLES))} messages",
                              ErrorCode.UNSUPPORTED, f"{where}.role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}",
                              param=f"{where}.role")
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            raise bad_request(f"{where}: assistant tool calls are not supported: the agent runs its own tools; "
                              "send the assistant's text only", ErrorCode.UNSUPPORTED, f"{where}.tool_calls")
        texts.append((role, _text_of(message.get("content"), f"{where}.content", required=role == "user")))
    total = sum(len(text) for _, text in texts)
    if total > limits.max_content_chars:
        raise bad_request(f"the messages hold {total} characters; this server accepts at most "
                          f"{limits.max_content_chars} per request (shorten the question)",
                          ErrorCode.CONTENT_TOO_LONG, "messages")
    users = [index for index, (role, _) in enumerate(texts) if role == "user"]
    if not users:
        raise bad_request("'messages' has no user message: the agent answers the last user message",
                          ErrorCode.NO_USER_MESSAGE, "messages")
    last = users[-1]
    if any(role == "assistant" for role, _ in texts[last + 1:]):
        raise bad_request(f"messages[{last}] is the last user message but assistant messages follow it; the "
                          "conversation must end with the user message the agent answers", param="messages")
    question = texts[last][1].strip()
    if not question:
        raise bad_request("the last user message is empty: send the question to answer",
                          ErrorCode.EMPTY_CONTENT, "messages")
    instructions = "\n".join(text.strip() for role, text in texts if role in INSTRUCTION_ROLES and text.strip())
    history = tuple(ChatTurn(Speaker(role), text.strip()) for role, text in texts[:last]
                    if role not in INSTRUCTION_ROLES and text.strip())
    return Conversation(question=question, instructions=instructions, history=history)


def _text_of(content: Any, where: str, *, required: bool) -> str:
    """Message content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None and not required:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}: only text parts are supported, got a {kind!r} part",
                                  ErrorCode.UNSUPPORTED, where)
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{where} must be a string or a list of text parts", param=where)


def _optional(body: dict[str, Any], key: str, kind: type) -> Any:
    """``body[key]`` when present and not null, checked to be a ``kind`` (ints count as floats)."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise bad_request(f"'{key}' must be a {kind.__name__}, got {value!r}", param=key)
    return value


# ------------------------------------------------------------------------------------ responses


def step_record(step: Step) -> dict[str, Any]:
    """One agent step as the ``agentflow`` field shows it."""
    return {
        "turn": step.turn,
        "tool": step.tool_name,
        "sub_goal": step.sub_goal,
        "command": step.command,
        "result": step.result,
        "tool_ok": step.tool_ok,
        "verdict": step.verdict.value,
        "verifier_reason": step.verifier_reason,
        "duration_s": round(step.duration_s, 3),
    }


def run_summary(traj: Trajectory, *, max_turns: int, conversation: Conversation | None = None) -> dict[str, Any]:
    """The whole run: what the non-streaming response and the last streamed chunk carry.

    ``history`` says how many earlier chat turns the agent read and how many were dropped to fit.
    """
    history = {"turns": len(conversation.history) if conversation else 0,
               "dropped_turns": conversation.dropped_turns if conversation else 0,
               "instructions": bool(conversation and conversation.instructions)}
    return {
        "history": history,
        "steps": [step_record(step) for step in traj.steps],
        "query_analysis": traj.query_analysis,
        "stop_reason": traj.stop_reason.value,
        "turns": len(traj.steps),
        "max_turns": max_turns,
        "tool_calls": dict(traj.tool_calls),
        "tool_errors": dict(traj.tool_errors),
        "parse_failures": dict(traj.parse_failures),
        "duration_s": round(traj.duration_s, 3),
    }


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(*, request_id: str, created: int, model: str, answer: str, agentflow: dict[str, Any],
                    usage: dict[str, int], reasoning: str | None = None,
                    finish_reason: FinishReason = FinishReason.STOP) -> dict[str, Any]:
    """A ``chat.completion`` whose message is the agent's answer."""
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason.value, "logprobs": None}],
        "usage": usage,
        "agentflow": agentflow,
    }


def chunk_body(*, request_id: str, created: int, model: str, delta: dict[str, Any],
               finish_reason: str | None = None, agentflow: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if agentflow is not None:
        chunk["agentflow"] = agentflow
    return chunk


def usage_chunk(*, request_id: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk sent for ``stream_options.include_usage``: no choices, only usage."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def step_delta(display: StepDisplay, text: str) -> dict[str, Any]:
    """The chunk delta that shows ``text`` (one step's readable line) the way ``display`` says."""
    if display is StepDisplay.CONTENT:
        return {"content": text}
    if display is StepDisplay.REASONING:
        return {"reasoning_content": text}
    return {}


def answer_delta(display: StepDisplay, answer: str) -> dict[str, Any]:
    """The delta carrying the answer; after steps shown as content, it is set apart by a heading."""
    return {"content": f"\nAnswer: {answer}" if display is StepDisplay.CONTENT else answer}


def event_text(kind: str, traj: Trajectory, step: Step | None) -> str:
    """A readable line (or a few) for one agent event, as a person following the stream reads it.

    ``kind`` is an ``AgentEventKind`` value: analysis, plan, command, result, verdict, answer.
    """
    if kind == "analysis":
        return f"Analysis: {_clip(traj.query_analysis)}\n"
    if step is None:
        return ""
    if kind == "plan":
        return f"\nStep {step.turn} · tool: {step.tool_name}\nSub-goal: {_clip(step.sub_goal)}\n"
    if kind == "command":
        return f"Command: {_clip(step.command)}\n" if step.command and step.command != step.sub_goal else ""
    if kind == "result":
        label = "Result" if step.tool_ok else "Result (tool failed)"
        return f"{label}: {_clip(step.result) or '(empty)'}\n"
    if kind == "verdict":
        reason = f" ({_clip(step.verifier_reason, 200)})" if step.verifier_reason else ""
        return f"Verifier: {step.verdict.value}{reason}\n"
    return ""


def event_record(kind: str, traj: Trajectory, step: Step | None) -> dict[str, Any]:
    """The structured ``agentflow`` field of the chunk for one agent event."""
    record: dict[str, Any] = {"event": kind}
    if kind == "analysis":
        record["query_analysis"] = traj.query_analysis
    elif kind == "answer":
        record["answer"] = traj.answer
    elif step is not None:
        record["step"] = step_record(step)
    return record


def steps_text(traj: Trajectory) -> str:
    """The readable text of a whole run (the non-streaming ``reasoning_content``)."""
    parts = [event_text("analysis", traj, None)]
    for step in traj.steps:
        parts.extend(event_text(kind, traj, step) for kind in ("plan", "command", "result", "verdict"))
    return "".join(parts)


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "flowlane"}


def _clip(text: str, max_chars: int = RESULT_PREVIEW_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 4].rstrip() + " ..."
