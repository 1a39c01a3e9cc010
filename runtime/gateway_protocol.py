"""The OpenAI chat-completions wire format, as the serving gateway speaks it (pure functions).

Existing clients (the official ``openai`` SDKs, LangChain, chat UIs) already know how to call
``POST /v1/chat/completions``. The gateway answers in that format, but behind each request runs a
whole AgentFlow trajectory instead of one generation. This module is the translation, kept free of
I/O so that it can be read and tested on its own:

- **Requests in.** ``parse_chat_request`` turns a raw body into a ``ChatRequest`` or raises an
  ``ApiError`` carrying the HTTP status and the OpenAI error body (``{"error": {"message", "type",
  "param", "code"}}``) that clients turn into ``BadRequestError``, ``NotFoundError``, ... The agent
  answers one question: the **last user message**. Earlier turns and system messages are checked
  but not given to the agent (its modules have their own prompts).
- **Answers out.** The message content is the agent's final answer; the steps it took (tool,
  sub-goal, command, result, verdict) travel in an extra top-level ``agentflow`` field, which
  OpenAI clients keep (their models allow extra fields).
- **Steps while they happen.** A streamed response is a series of ``chat.completion.chunk`` server-
  sent events: every agent event becomes a readable text delta (in ``content`` by default, or in
  ``reasoning_content``, the field chat UIs show as "thinking") plus a structured ``agentflow``
  field; then the answer, a final chunk with the run summary, optional usage, and ``[DONE]``.

Request fields beyond OpenAI's, all optional: ``max_turns`` and ``max_time_s`` (the agent's turn
and agent-loop time budgets, clamped to the server's caps) and ``agentflow_steps`` (a
``StepDisplay``). Of OpenAI's sampling fields, ``temperature`` sets the planner's and ``seed`` seeds
the run; the others (``max_tokens``, ``stop``, ``tools``, ...) are accepted and ignored, because
each agent module has its own token budget and output format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowlane.runtime.trajectory import Step, Trajectory

RESULT_PREVIEW_CHARS = 600  # tool results in the readable stream text; the structured field is complete
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ErrorType(StrEnum):
    """The ``error.type`` values OpenAI clients know."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
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
    NONE = "none"  # only the structured ``agentflow`` field


class ApiError(Exception):
    """A request that cannot be served, with its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: ErrorType = ErrorType.INVALID_REQUEST,
                 code: ErrorCode, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: ErrorType, code: ErrorCode, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type.value, "param": param, "code": code.value}}


def bad_request(message: str, code: ErrorCode = ErrorCode.INVALID_VALUE, param: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


# ------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; the server's caps."""

    max_content_chars: int = 4000  # all message text together
    max_messages: int = 64
    max_turns: int = 10  # requests asking for more turns get this many
    max_time_s: float = 120.0  # requests asking for a longer agent loop get this long


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request, reduced to what the agent needs."""

    model: str
    question: str
    stream: bool = False
    include_usage: bool = False
    max_turns: int = 10
    max_time_s: float = 120.0
    temperature: float | None = None  # planner sampling; None keeps the server's setting
    seed: int | None = None
    steps: StepDisplay | None = None  # None: the server's default


def parse_chat_request(raw: bytes, limits: RequestLimits) -> ChatRequest:
    """The request in ``raw`` (a JSON body), checked; ``ApiError`` (400) naming the first problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise bad_request(f"the request body is not valid JSON ({err}); send a JSON object",
                          ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          ErrorCode.INVALID_JSON)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required: name the served model (see GET /v1/models)", param="model")
    question = _question_from(body.get("messages"), limits)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (one agent run per request), got {n!r}", ErrorCode.UNSUPPORTED, "n")
    stream = _optional(body, "stream", bool) or False
    options = _optional(body, "stream_options", dict) or {}
    include_usage = options.get("include_usage") is True
    max_turns = _optional(body, "max_turns", int)
    if max_turns is not None and max_turns < 1:
        raise bad_request(f"'max_turns' must be >= 1, got {max_turns}", param="max_turns")
    max_time_s = _optional(body, "max_time_s", float)
    if max_time_s is not None and not (max_time_s > 0 and math.isfinite(max_time_s)):
        raise bad_request(f"'max_time_s' must be a positive number of seconds, got {max_time_s}", param="max_time_s")
    temperature = _optional(body, "temperature", float)
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise bad_request(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    steps_text = _optional(body, "agentflow_steps", str)
    steps = None
    if steps_text is not None:
        try:
            steps = StepDisplay(steps_text)
        except ValueError:
            choices = ", ".join(d.value for d in StepDisplay)
            raise bad_request(f"'agentflow_steps' must be one of {choices}, got {steps_text!r}",
                              param="agentflow_steps") from None
    return ChatRequest(
        model=model.strip(),
        question=question,
        stream=stream,
        include_usage=include_usage,
        max_turns=min(max_turns or limits.max_turns, limits.max_turns),
        max_time_s=min(max_time_s or limits.max_time_s, limits.max_time_s),
        temperature=temperature,
        seed=_optional(body, "seed", int),
        steps=steps,
    )


def _question_from(messages: Any, limits: RequestLimits) -> str:
    """The last user message's text, after checking every message's shape and the size cap."""
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
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}",
                              param=f"{where}.role")
        texts.append((role, _text_of(message.get("content"), f"{where}.content", required=role == "user")))
    total = sum(len(text) for _, text in texts)
    if total > limits.max_content_chars:
        raise bad_request(f"the messages hold {total} characters; this server accepts at most "
                          f"{limits.max_content_chars} per request (shorten the question)",
                          ErrorCode.CONTENT_TOO_LONG, "messages")
    user_texts = [text for role, text in texts if role == "user"]
    if not user_texts:
        raise bad_request("'messages' has no user message: the agent answers the last user message",
                          ErrorCode.NO_USER_MESSAGE, "messages")
    question = user_texts[-1].strip()
    if not question:
        raise bad_request("the last user message is empty: send the question to answer",
                          ErrorCode.EMPTY_CONTENT, "messages")
    return question


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


def run_summary(traj: Trajectory, *, max_turns: int) -> dict[str, Any]:
    """The whole run: what the non-streaming response and the last streamed chunk carry."""
    return {
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
                    usage: dict[str, int], reasoning: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` whose message is the agent's answer."""
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
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

    ``kind`` is an ``EventKind`` value: analysis, plan, command, result, verdict, answer.
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
