"""The serving gateway: an OpenAI-compatible API in front of the AgentFlow agent.

Three kinds of tests:
- the official ``openai`` client (``AsyncOpenAI``) against a real gateway on loopback that runs
  the REAL agent on the bundled model through the session ``vllm_engine`` (the server runs in the
  session event loop, the loop the vLLM engine is bound to): a completion that used a tool, a
  streamed run, budgets, auth, bad input, metrics;
- a second real gateway on loopback around ``CannedEngine``, a fake engine, ONLY for what the real
  model cannot be made to do on demand: fail (500, and the server keeps serving), fail mid-stream,
  and run slowly enough to show that requests overlap;
- the pure request/response translation (``flowlane.runtime.serving.protocol``), and ``flowlane serve`` with a bad
  model path as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import typer
from openai import AsyncOpenAI
from typer.testing import CliRunner

from flowlane.api.errors import EngineUnavailableError
from flowlane.api.trajectory import Step, Trajectory, Verdict
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.serving.app import create_app
from flowlane.runtime.serving.config import PROMPT_RESERVE_TOKENS, GatewayConfig
from flowlane.runtime.serving.gateway import bind_socket, running_gateway, serve
from flowlane.runtime.serving.protocol import (
    ErrorCode,
    OpenAIError,
    RequestLimits,
    event_text,
    parse_chat_request,
)
from flowlane.runtime.serving.sandbox import SandboxChild
from flowlane.runtime.tools.base import Tool, ToolResult
from flowlane.runtime.tools.registry import build_tools

in_session_loop = pytest.mark.asyncio(loop_scope="session")  # the loop the session vLLM engine runs in

MODEL = "flowlane-agent"
API_KEY = "test-key-5f1c"
MAX_CONTENT_CHARS = 2000
SERVER_MAX_TURNS = 2
HISTORY_MAX_TOKENS = 256
QUESTION = "What is 17 * 23? Compute it with Python."
EVENT_ORDER = ["analysis", "plan", "command", "result", "verdict", "answer"]


# ============================================================================ fixtures


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sandbox_child() -> AsyncIterator[SandboxChild]:
    """The sandbox server child the session gateway's python tool runs code in, as `flowlane serve` does."""
    child = SandboxChild(max_concurrency=2)
    await child.start()
    yield child
    await child.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gateway_url(vllm_engine: LLMEngine, sandbox_child: SandboxChild) -> AsyncIterator[str]:
    """A gateway on loopback running the real agent (python, search, generator) on the session engine."""
    tools = build_tools(["python", "search", "generator"], engine=vllm_engine, code_runner=sandbox_child)
    config = GatewayConfig(
        served_model_name=MODEL,
        api_key=API_KEY,
        limits=RequestLimits(max_content_chars=MAX_CONTENT_CHARS, max_turns=SERVER_MAX_TURNS, max_time_s=120.0),
        history_max_tokens=HISTORY_MAX_TOKENS,
    )
    async with running_gateway(create_app(vllm_engine, tools, config=config)) as url:
        yield url
    for tool in tools:
        await tool.close()


def client_for(url: str, api_key: str = API_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300.0)


@pytest.fixture
def client(gateway_url: str) -> AsyncOpenAI:
    return client_for(gateway_url)


async def metric(url: str, name: str, **labels: str) -> float:
    """One sample's value from ``GET /metrics`` (0 when the series does not exist yet)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and ",".join(sorted((match.group(2) or "").split(","))) == wanted:
            return float(match.group(3))
    return 0.0


def agentflow(reply: Any) -> dict[str, Any]:
    """The gateway's extra ``agentflow`` field of a completion or chunk ({} when absent)."""
    return dict((reply.model_extra or {}).get("agentflow") or {})


async def still_serving(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [model.id for model in models.data] == [MODEL]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tool_completion(gateway_url: str) -> dict[str, Any]:
    """One real non-streaming completion (one turn), with the metrics read before and after it."""
    series = {
        "requests": ("flowlane_gateway_requests_total", {"endpoint": "/v1/chat/completions", "status": "200"}),
        "runs": ("flowlane_gateway_agent_turns_count", {}),
        "turns": ("flowlane_gateway_agent_turns_sum", {}),
    }
    before = {key: await metric(gateway_url, name, **labels) for key, (name, labels) in series.items()}
    response = await client_for(gateway_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body={"max_turns": 1},
    )
    after = {key: await metric(gateway_url, name, **labels) for key, (name, labels) in series.items()}
    tool = agentflow(response)["steps"][0]["tool"]
    tool_calls = await metric(gateway_url, "flowlane_gateway_tool_calls_total", tool=tool)
    return {"response": response, "before": before, "after": after, "tool_calls_after": tool_calls}


# ============================================================================ real agent behind the API


@in_session_loop
async def test_completion_answers_with_the_agents_final_answer(tool_completion: dict[str, Any]) -> None:
    response = tool_completion["response"]
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert (choice.message.content or "").strip()
    assert choice.message.content != QUESTION


@in_session_loop
async def test_completion_shows_the_tool_call_with_its_result(tool_completion: dict[str, Any]) -> None:
    flow = agentflow(tool_completion["response"])
    (step,) = flow["steps"]  # max_turns=1: exactly one planner turn, one tool call
    assert step["turn"] == 1
    assert step["tool"] in {"python", "search", "generator"}
    assert step["sub_goal"].strip()
    assert step["result"].strip()
    assert flow["tool_calls"] == {step["tool"]: 1}
    assert flow["stop_reason"] == "turn_budget"
    assert flow["turns"] == 1 and flow["max_turns"] == 1
    assert flow["query_analysis"].strip()


@in_session_loop
async def test_completion_reports_token_usage(tool_completion: dict[str, Any]) -> None:
    usage = tool_completion["response"].usage
    # analysis, planner, executor (unless the generator tool was chosen), solution generator
    assert usage.prompt_tokens > 100
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@in_session_loop
async def test_metrics_count_the_request_its_turns_and_its_tool_call(tool_completion: dict[str, Any]) -> None:
    before, after = tool_completion["before"], tool_completion["after"]
    assert after["requests"] - before["requests"] == 1
    assert after["runs"] - before["runs"] == 1
    assert after["turns"] - before["turns"] == 1
    assert tool_completion["tool_calls_after"] >= 1


@in_session_loop
async def test_stream_sends_each_step_as_it_happens_then_the_answer(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}, extra_body={"max_turns": 1, "agentflow_steps": "content"},
    )
    chunks: list[tuple[float, Any]] = [(time.monotonic(), chunk) async for chunk in stream]
    bodies = [chunk for _, chunk in chunks]
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in bodies)
    assert bodies[0].choices[0].delta.role == "assistant"
    events = [(at, agentflow(chunk)) for at, chunk in chunks if agentflow(chunk).get("event")]
    assert [flow["event"] for _, flow in events] == EVENT_ORDER
    # Steps arrive while the agent works: the plan long before the answer (which needs a generation).
    arrival = {flow["event"]: at for at, flow in events}
    assert arrival["answer"] - arrival["plan"] > 0.05
    # The readable text: the step, its result, then the answer.
    text = "".join(chunk.choices[0].delta.content or "" for chunk in bodies if chunk.choices)
    answer = events[-1][1]["answer"]
    assert text.index("Step 1 · tool: ") < text.index("Result") < text.index(f"Answer: {answer}")
    final = [chunk for chunk in bodies if chunk.choices and chunk.choices[0].finish_reason == "stop"]
    assert len(final) == 1 and agentflow(final[0])["stop_reason"] == "turn_budget"
    assert bodies[-1].choices == [] and bodies[-1].usage.completion_tokens > 0


@in_session_loop
async def test_a_request_over_its_time_limit_ends_with_a_partial_answer(
        client: AsyncOpenAI, vllm_engine: Any) -> None:
    started = time.monotonic()
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body={"max_time_s": 3, "max_turns": 2},
    )
    elapsed = time.monotonic() - started
    (choice,) = response.choices
    assert choice.finish_reason == "time_limit"
    assert agentflow(response)["stop_reason"] == "time_budget"
    assert (choice.message.content or "").strip()
    assert elapsed < 3 + 4  # the limit, plus HTTP and scheduling slack; never the 15 s hard ceiling
    assert vllm_engine.num_unfinished_requests() == 0  # the cut generations were aborted


@in_session_loop
async def test_a_tiny_time_limit_still_answers_and_says_why(client: AsyncOpenAI) -> None:
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body={"max_time_s": 0.001},
    )
    flow = agentflow(response)
    assert flow["stop_reason"] == "time_budget" and flow["steps"] == []
    assert response.choices[0].finish_reason == "time_limit"
    assert response.choices[0].message.content == "(no answer: the time ran out before any step finished)"


FOLLOW_UP: list[Any] = [
    {"role": "user", "content": "Let's do some arithmetic."},
    {"role": "assistant", "content": "Sure, what should I compute?"},
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "17 * 23 = 391."},
    {"role": "user", "content": "Now divide that by 17."},
]


@in_session_loop
async def test_a_follow_up_question_is_answered_from_the_conversation(client: AsyncOpenAI) -> None:
    """"that" is 17 * 23 = 391, which only the history says; asked alone, the same question mentions neither.

    The bundled 135M model does not divide reliably, so this checks that the answer draws on the
    history (23 or 391 appear), not that it is 23.
    """
    with_history, alone = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=messages, seed=0, extra_body={"max_turns": 1})
        for messages in (FOLLOW_UP, FOLLOW_UP[-1:])))
    assert agentflow(with_history)["history"] == {"turns": 4, "dropped_turns": 0, "instructions": False}
    from_history = re.compile(r"\b(23|391)\b")
    assert from_history.search(with_history.choices[0].message.content or "")
    assert not from_history.search(alone.choices[0].message.content or "")


@in_session_loop
async def test_a_system_message_changes_the_answers_form(client: AsyncOpenAI) -> None:
    question: Any = {"role": "user", "content": "What is the capital of France?"}
    system: Any = {"role": "system", "content": "Always begin your answer with the word 'Bonjour'."}
    told, untold = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=messages, seed=0, extra_body={"max_turns": 1})
        for messages in ([system, question], [question])))
    assert agentflow(told)["history"]["instructions"] is True
    assert (told.choices[0].message.content or "").lower().startswith("bonjour")
    assert not (untold.choices[0].message.content or "").lower().startswith("bonjour")


@in_session_loop
async def test_max_tokens_bounds_the_final_answer(client: AsyncOpenAI, vllm_engine: Any) -> None:
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, extra_body={"max_turns": 1})
    answer = response.choices[0].message.content or ""
    assert response.choices[0].finish_reason == "length"
    assert 0 < len(vllm_engine.tokenizer.encode(answer, add_special_tokens=False)) <= 4 + 1  # +1: re-tokenizing


@in_session_loop
async def test_include_usage_sends_a_last_chunk_with_the_runs_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}, extra_body={"max_turns": 1})
    chunks = [chunk async for chunk in stream]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 100 and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(chunk.usage is None for chunk in body)
    # A plain client sees a plain completion: the content is the answer alone.
    content = "".join(chunk.choices[0].delta.content or "" for chunk in body if chunk.choices)
    assert content == agentflow(next(c for c in body if agentflow(c).get("event") == "answer"))["answer"]


async def engine_idle(engine: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while engine.num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return bool(engine.num_unfinished_requests() == 0)


@in_session_loop
async def test_disconnecting_mid_stream_cancels_the_engine_requests(
        client: AsyncOpenAI, gateway_url: str, vllm_engine: Any) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True, extra_body={"max_turns": 2})
    async for chunk in stream:
        if agentflow(chunk).get("event") == "plan":
            break
    await stream.close()
    assert await engine_idle(vllm_engine, within_s=5.0)
    await asyncio.sleep(1.5)  # a run still going would have sent its executor call by now
    assert vllm_engine.num_unfinished_requests() == 0
    assert await metric(gateway_url, "flowlane_gateway_agent_runs_in_flight") == 0


@in_session_loop
async def test_disconnecting_from_a_plain_request_cancels_its_run(gateway_url: str, vllm_engine: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_turns": 2}
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=2.0,
                            headers={"authorization": f"Bearer {API_KEY}"})
    assert await engine_idle(vllm_engine, within_s=5.0)
    await asyncio.sleep(1.5)
    assert vllm_engine.num_unfinished_requests() == 0
    assert await metric(gateway_url, "flowlane_gateway_agent_runs_in_flight") == 0


@in_session_loop
async def test_models_lists_the_served_model(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [(model.id, model.object, model.owned_by) for model in models.data] == [(MODEL, "model", "flowlane")]
    assert (await client.models.retrieve(MODEL)).id == MODEL


# ============================================================================ auth


@in_session_loop
async def test_wrong_token_is_refused_with_an_openai_401(gateway_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await client_for(gateway_url, api_key="not-the-key").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    await still_serving(client_for(gateway_url))


@in_session_loop
async def test_missing_token_is_refused_with_an_openai_401(gateway_url: str) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{gateway_url}/v1/models")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]


@in_session_loop
async def test_probes_and_metrics_need_no_token(gateway_url: str) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{gateway_url}/healthz")).json() == {"status": "ok"}
        assert (await http.get(f"{gateway_url}/readyz")).json() == {"status": "ready", "model": MODEL}
        assert (await http.get(f"{gateway_url}/metrics")).status_code == 200


# ============================================================================ bad input


@in_session_loop
@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([], "missing_messages"),
        ([{"role": "system", "content": "You are helpful."}], "no_user_message"),
        ([{"role": "user", "content": "   "}], "empty_content"),
        ([{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}], "content_too_long"),
        ([{"role": "wizard", "content": "hi"}], "invalid_value"),
    ],
    ids=["no-messages", "no-user-message", "empty-content", "oversized", "unknown-role"],
)
async def test_bad_messages_are_an_openai_400_and_the_server_keeps_serving(
    client: AsyncOpenAI, messages: list[dict[str, str]], code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert caught.value.code == code
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    await still_serving(client)


@in_session_loop
@pytest.mark.parametrize(
    ("messages", "code", "named"),
    [
        ([{"role": "system", "content": "Be brief. " * 150}, {"role": "user", "content": "hi"}],
         "context_length_exceeded", "history cap is 256 tokens"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"},
          {"role": "user", "content": "and?"}], "unsupported_parameter", "messages[1]: tool messages"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
          {"role": "user", "content": "and?"}], "unsupported_parameter", "assistant tool calls"),
        ([{"role": "wizard", "content": "hi"}], "invalid_value", "messages[0].role must be one of"),
    ],
    ids=["history-cannot-fit", "tool-message", "assistant-tool-call", "unknown-role"],
)
async def test_unservable_conversations_are_an_openai_400_naming_what_to_fix(
    client: AsyncOpenAI, messages: list[dict[str, Any]], code: str, named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert caught.value.code == code
    assert named in caught.value.message
    await still_serving(client)


@in_session_loop
@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "unsupported_parameter",
         "tools"),
        ({"logprobs": True}, "unsupported_parameter", "logprobs"),
        ({"top_k": 5}, "unknown_parameter", "top_k"),
        ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
    ],
    ids=["tools", "logprobs", "unknown-field", "stream-options-without-stream"],
)
async def test_fields_that_cannot_apply_are_refused_not_ignored(
    client: AsyncOpenAI, extra: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             extra_body=extra)
    assert (caught.value.code, caught.value.param) == (code, param)


@in_session_loop
async def test_a_10_mb_body_is_an_openai_413(gateway_url: str, client: AsyncOpenAI) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (10 << 20)}]}).encode()
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{gateway_url}/v1/chat/completions", content=body,
                                headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and "shorten the messages" in error["message"]
    await still_serving(client)


@in_session_loop
async def test_malformed_json_is_an_openai_400(gateway_url: str, client: AsyncOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{gateway_url}/v1/chat/completions", content=b'{"model": "flowlane-agent", "mess',
                                headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    await still_serving(client)


@in_session_loop
async def test_unknown_model_is_an_openai_404(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.code == "model_not_found"
    assert "'gpt-4o'" in caught.value.message and MODEL in caught.value.message
    await still_serving(client)


@in_session_loop
async def test_errors_are_counted_by_code(gateway_url: str, client: AsyncOpenAI) -> None:
    before = await metric(gateway_url, "flowlane_gateway_errors_total", code="model_not_found")
    before_404 = await metric(gateway_url, "flowlane_gateway_requests_total",
                              endpoint="/v1/chat/completions", status="404")
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert await metric(gateway_url, "flowlane_gateway_errors_total", code="model_not_found") == before + 1
    assert await metric(gateway_url, "flowlane_gateway_requests_total",
                        endpoint="/v1/chat/completions", status="404") == before_404 + 1


@in_session_loop
async def test_unknown_route_is_an_openai_404(gateway_url: str) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{gateway_url}/v2/anything")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


# ======================================================================= engine failures, concurrency (fake engine)

CANNED_REPLY = json.dumps({
    "justification": "j", "context": "c", "sub_goal": "compute 17*23", "tool_name": "python",
    "command": "print(17*23)", "reason": "the result answers it", "conclusion": "STOP",
})


class CannedEngine(LLMEngine):
    """A fake engine for what the real model cannot do on demand: fail, or be slow.

    Every call answers ``CANNED_REPLY`` (a JSON object every agent module can parse) after
    ``delay_s``, or raises while ``failures_left`` > 0. It records how many calls overlapped.
    """

    name = "canned"
    supports_structured_output = True

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.failures_left = 0
        self.fail_on_call: int | None = None
        self.failure: Exception = RuntimeError("device lost")
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.failures_left > 0 or self.calls == self.fail_on_call:
            self.failures_left = max(0, self.failures_left - 1)
            raise self.failure
        ids = list(range(len(CANNED_REPLY)))
        return Generation(prompt_ids=[1, 2, 3], token_ids=ids, logprobs=[-0.1] * len(ids), text=CANNED_REPLY)


class EchoTool(Tool):
    name = "python"
    description = "echo"

    async def execute(self, command: str) -> ToolResult:
        return ToolResult(output=f"ran {command}")


@pytest_asyncio.fixture(loop_scope="session")
async def canned() -> AsyncIterator[tuple[CannedEngine, AsyncOpenAI, str]]:
    engine = CannedEngine(delay_s=0.2)
    app = create_app(engine, [EchoTool()], config=GatewayConfig(served_model_name=MODEL))
    async with running_gateway(app) as url:
        yield engine, client_for(url, api_key="unused"), url


@in_session_loop
async def test_a_served_turn_floor_holds_the_verifier_back_and_yields_to_a_smaller_max_turns() -> None:
    from flowlane.runtime.agent.agent import AgentConfig

    engine = CannedEngine()  # its verifier says STOP at every chance
    config = GatewayConfig(served_model_name=MODEL, agent=AgentConfig(max_turns=4, min_turns=2))
    async with running_gateway(create_app(engine, [EchoTool()], config=config)) as url:
        client = client_for(url, api_key="unused")
        runs = [agentflow(await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body={"max_turns": turns}))
            for turns in (4, 1)]
    assert [(run["turns"], run["stop_reason"]) for run in runs] == [(2, "verifier_stop"), (1, "turn_budget")]
    assert [(step["verdict"], step["verifier_reason"]) for step in runs[0]["steps"]] == [
        ("CONTINUE", "below 2 turns (verifier not asked)"), ("STOP", "the result answers it")]


@in_session_loop
async def test_engine_failure_is_an_openai_500_and_the_next_request_is_served(
    canned: tuple[CannedEngine, AsyncOpenAI, str],
) -> None:
    engine, client, _ = canned
    engine.failures_left = 2  # the loop's first call, then the solution generator's
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.code == "engine_error"
    assert "RuntimeError: device lost" in caught.value.message
    response = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert agentflow(response)["steps"][0]["result"] == "ran print(17*23)"


@in_session_loop
async def test_a_dead_engine_makes_readyz_fail_and_later_requests_a_503(
    canned: tuple[CannedEngine, AsyncOpenAI, str],
) -> None:
    engine, client, url = canned
    engine.failures_left, engine.failure = 10**6, EngineUnavailableError("the vLLM engine is closed")
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.status_code == 500 and caught.value.code == "engine_error"
    async with httpx.AsyncClient() as http:
        ready = await http.get(f"{url}/readyz")
        alive = await http.get(f"{url}/healthz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "failed", "error": "EngineUnavailableError: the vLLM engine is closed"}
    assert alive.status_code == 200
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.status_code == 503 and caught.value.code == "not_ready"


@in_session_loop
async def test_engine_failure_mid_stream_arrives_as_an_error_event(
    canned: tuple[CannedEngine, AsyncOpenAI, str],
) -> None:
    engine, client, _ = canned
    engine.fail_on_call = 5  # analysis, plan, command, verifier pass; the answer fails
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="device lost"):
        async for chunk in stream:
            seen.append(agentflow(chunk).get("event", ""))
    assert [event for event in seen if event] == ["analysis", "plan", "command", "result", "verdict"]


@in_session_loop
async def test_a_client_that_leaves_mid_stream_stops_its_agent_run(
    canned: tuple[CannedEngine, AsyncOpenAI, str],
) -> None:
    engine, client, url = canned
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True)
    async for chunk in stream:
        if agentflow(chunk).get("event") == "plan":
            break
    await stream.close()
    await asyncio.sleep(0.5)  # the server notices the closed connection and cancels the run
    calls = engine.calls
    await asyncio.sleep(0.6)  # three more engine calls' time: none may start
    assert engine.calls == calls and engine.in_flight == 0
    assert engine.calls < 5  # the answer was never generated
    assert await metric(url, "flowlane_gateway_agent_runs_in_flight") == 0


@in_session_loop
async def test_a_burst_over_the_limit_gets_429s_with_retry_after() -> None:
    app = create_app(CannedEngine(delay_s=0.3), [EchoTool()],
                     config=GatewayConfig(served_model_name=MODEL, max_concurrent_runs=2))
    async with running_gateway(app) as url:
        client = client_for(url, api_key="unused")
        replies = await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(5)), return_exceptions=True)
        refused = [reply for reply in replies if isinstance(reply, openai.RateLimitError)]
        served = [reply for reply in replies if not isinstance(reply, BaseException)]
        assert (len(served), len(refused)) == (2, 3)
        for error in refused:
            assert error.status_code == 429 and error.code == "rate_limit_exceeded"
            assert int(error.response.headers["retry-after"]) >= 1
        # Slots come back: the next request is served.
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}])


class SlowAnswerEngine(CannedEngine):
    """``CannedEngine`` whose fifth call (the solution generator's) takes ``answer_s``."""

    def __init__(self, answer_s: float) -> None:
        super().__init__()
        self.answer_s = answer_s

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        if self.calls == 4:  # analysis, plan, command and verifier are done
            await asyncio.sleep(self.answer_s)
        return await super().chat(messages, settings)


@in_session_loop
async def test_an_answer_cut_by_the_time_limit_is_the_last_tool_result() -> None:
    app = create_app(SlowAnswerEngine(answer_s=30.0), [EchoTool()], config=GatewayConfig(served_model_name=MODEL))
    async with running_gateway(app) as url:
        started = time.monotonic()
        response = await client_for(url, api_key="unused").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body={"max_time_s": 2})
        elapsed = time.monotonic() - started
    assert 1.8 < elapsed < 4.0
    assert response.choices[0].finish_reason == "time_limit"
    assert response.choices[0].message.content == "ran print(17*23)"


@in_session_loop
async def test_requests_run_concurrently_through_one_engine(canned: tuple[CannedEngine, AsyncOpenAI, str]) -> None:
    engine, client, _ = canned
    started = time.monotonic()
    replies = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
        for i in range(4)
    ))
    elapsed = time.monotonic() - started
    assert len(replies) == 4
    assert engine.max_in_flight == 4
    # 5 engine calls of 0.2 s per run: about 1 s when overlapped, 4 s one request at a time
    assert elapsed < 2.5


@in_session_loop
async def test_chat_before_the_engine_is_loaded_is_a_503_and_readyz_says_loading() -> None:
    app = create_app(None, config=GatewayConfig(served_model_name=MODEL))
    async with running_gateway(app) as url:
        client = client_for(url, api_key="unused")
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/readyz")).status_code == 503
            assert (await http.get(f"{url}/healthz")).status_code == 200
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.code == "not_ready"
        app.state.gateway.attach(CannedEngine(), [EchoTool()])
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/readyz")).status_code == 200


# ============================================================================ the wire format (pure)

LIMITS = RequestLimits(max_content_chars=100, max_turns=3, max_time_s=30.0)


def parse(**body: Any) -> Any:
    body.setdefault("model", MODEL)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(json.dumps(body).encode(), LIMITS)


def test_budgets_above_the_server_caps_are_clamped_and_missing_ones_default_to_them() -> None:
    assert (parse(max_turns=50, max_time_s=999).max_turns, parse(max_turns=50, max_time_s=999).max_time_s) == (3, 30.0)
    assert (parse(max_turns=2, max_time_s=5).max_turns, parse(max_turns=2, max_time_s=5).max_time_s) == (2, 5.0)
    assert (parse().max_turns, parse().max_time_s) == (3, 30.0)


def test_the_question_is_the_last_user_message_with_text_parts_joined() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
    ]
    assert parse(messages=messages).question == "What is\n2+2?"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         ErrorCode.UNSUPPORTED, "messages[0].content"),
        ({"n": 2}, ErrorCode.UNSUPPORTED, "n"),
        ({"max_turns": 0}, ErrorCode.INVALID_VALUE, "max_turns"),
        ({"max_turns": "3"}, ErrorCode.INVALID_VALUE, "max_turns"),
        ({"temperature": 3}, ErrorCode.INVALID_VALUE, "temperature"),
        ({"agentflow_steps": "loud"}, ErrorCode.INVALID_VALUE, "agentflow_steps"),
        ({"model": ""}, ErrorCode.INVALID_VALUE, "model"),
    ],
    ids=["image-part", "n", "zero-turns", "string-turns", "temperature", "steps-display", "empty-model"],
)
def test_invalid_fields_are_named_in_the_error(body: dict[str, Any], code: ErrorCode, param: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(**body)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)


def test_a_json_array_body_is_invalid_json_for_the_api() -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_chat_request(b"[1, 2]", LIMITS)
    assert caught.value.code is ErrorCode.INVALID_JSON


def test_step_events_read_as_text() -> None:
    traj = Trajectory(question="q", query_analysis="needs arithmetic")
    step = Step(turn=2, tool_name="python", sub_goal="compute 17*23", command="print(17*23)", result="391",
                verdict=Verdict.STOP, verifier_reason="done")
    assert event_text("analysis", traj, None) == "Analysis: needs arithmetic\n"
    assert event_text("plan", traj, step) == "\nStep 2 · tool: python\nSub-goal: compute 17*23\n"
    assert event_text("command", traj, step) == "Command: print(17*23)\n"
    assert event_text("result", traj, step) == "Result: 391\n"
    assert event_text("verdict", traj, step) == "Verifier: STOP (done)\n"
    step.tool_ok, step.result = False, "[timeout] killed"
    assert event_text("result", traj, step) == "Result (tool failed): [timeout] killed\n"


# ============================================================================ flowlane serve


@in_session_loop
async def test_connections_to_the_gateway_socket_send_without_nagle_delay() -> None:
    """Accepted connections get TCP_NODELAY: with Nagle's algorithm on, a response body waited
    for the client's delayed ACK of the headers, ~40 ms per request."""
    sock = bind_socket("127.0.0.1", 0)
    nodelay: list[int] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)  # as uvicorn serves the socket
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await reader.read() == b""  # closed by the server, after it looked
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert nodelay == [1]


def test_serve_with_a_missing_checkpoint_exits_with_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    env = {**os.environ, "FLOWLANE_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("flowlane")), "serve", "--model", str(missing), "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def _serve_cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(serve)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "tpu"], "unknown engine 'tpu'"),
        (["--tools", "python,calculator"], "calculator"),
        (["--stream-steps", "loud"], "--stream-steps"),
        (["--max-turns", "0"], "--max-turns"),
        (["--max-turns", "3", "--min-turns", "4"], "--min-turns must be between 1 and --max-turns (3), got 4"),
        (["--api-key", " "], "API key is empty"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--fixed", "/no/such/model"], "/no/such/model"),
    ],
    ids=["bad-engine", "unknown-tool", "bad-steps-display", "zero-turns", "turn-floor-above-budget",
         "empty-api-key", "bad-dtype",
         "missing-fixed"],
)
def test_serve_bad_options_are_one_line_errors_before_any_engine_starts(
    model_dir: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(_serve_cli(), ["--model", str(model_dir), "--port", "0", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_serve_on_a_taken_port_is_a_one_line_error(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(_serve_cli(), ["--model", str(model_dir), "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another --port or --host")



@pytest.mark.slow  # the real `flowlane serve` process with two transformers engines
def test_serve_fetches_a_checkpoint_uri_and_runs_the_fixed_modules_on_their_own_engine(
        model_dir: Path, tmp_path: Path) -> None:
    """`flowlane serve` as a FlowService pod runs it: the planner from a FlowRun checkpoint URI
    (resolved while the probes already answer), the executor/verifier/generator on --fixed."""
    from flowlane.kit.checkpoints import CheckpointStore

    store = CheckpointStore.from_uri((tmp_path / "store").as_uri())
    uri = store.save(7, model_dir, meta={}).uri
    env = {**os.environ, "FLOWLANE_HOME": str(tmp_path / "home")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("flowlane")), "serve", "--model", uri, "--fixed", str(model_dir),
             "--engine", "transformers", "--dtype", "float32", "--port", str(port), "--log-level", "debug"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["step-00000007"]
    finally:
        proc.terminate()
        returncode = proc.wait(timeout=60)
    assert returncode == 0, log.read_text()[-3000:]
    assert f"executor, verifier and generator on a second engine with {model_dir}" in log.read_text()


# ============================================================================ the python tool's sandbox child


def test_the_sandbox_child_gets_none_of_the_gateways_secrets(sandbox_child: SandboxChild) -> None:
    assert sandbox_child.pid is not None and sandbox_child.pid != os.getpid()
    environ = Path(f"/proc/{sandbox_child.pid}/environ").read_bytes().split(b"\0")
    names = sorted(entry.split(b"=", 1)[0].decode() for entry in environ if entry)
    assert set(names) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
                          "FLOWLANE_GRPC_TOKEN"}


@in_session_loop
async def test_a_sandbox_child_started_with_secrets_around_does_not_inherit_them() -> None:
    secrets = {"FLOWLANE_API_KEY": "api-secret", "AWS_ACCESS_KEY_ID": "s3-id", "AWS_SECRET_ACCESS_KEY": "s3-secret",
               "FLOWLANE_TOOL_WEB_SEARCH_KEY": "tool-secret"}
    child = SandboxChild(parent_env={**os.environ, **secrets})
    await child.start()
    try:
        environ = Path(f"/proc/{child.pid}/environ").read_bytes()
        assert not [value for value in secrets.values() if value.encode() in environ]
        result = await child.run("import os; print(sorted(k for k in os.environ if 'KEY' in k or 'AWS' in k))")
        assert result.ok, result.message
        assert result.stdout.strip() == "[]"
    finally:
        await child.close()


@in_session_loop
async def test_a_sandbox_child_that_dies_is_restarted_on_the_next_run() -> None:
    child = SandboxChild()
    await child.start()
    try:
        first = child.pid
        assert first is not None
        os.kill(first, 9)
        await asyncio.sleep(0.3)
        result = await child.run("print(6 * 7)")
        assert result.ok and result.stdout.strip() == "42", result.message
        assert child.restarts == 1 and child.pid != first
    finally:
        await child.close()


def test_module_prompts_without_the_conversation_fit_the_reserve(model_dir: Path) -> None:
    """PROMPT_RESERVE_TOKENS bounds the longest module prompt (the planner's, full memory) plus its output."""
    from transformers import AutoTokenizer

    from flowlane.kit.models import encode_chat
    from flowlane.runtime.agent.agent import AgentConfig
    from flowlane.runtime.agent.memory import render_steps
    from flowlane.runtime.agent.prompts import planner_messages

    tools = build_tools(["python", "search", "generator"], engine=CannedEngine())
    config = AgentConfig()
    steps = [Step(turn=i, tool_name="python", sub_goal="Compute the sum of the primes below 1000 " * 5,
                  command="print(sum(p for p in range(1000)))" * 8, result="76127 " * 100) for i in range(1, 10)]
    memory = render_steps(steps, max_result_chars=config.memory_result_chars, max_total_chars=config.memory_total_chars)
    messages = planner_messages("q " * 10, "an analysis " * 40, [t.card() for t in tools], memory, turn=10,
                                max_turns=10, history="User: x", instructions="y")
    tokens = len(encode_chat(AutoTokenizer.from_pretrained(model_dir), messages))
    assert tokens + config.planner.max_tokens <= PROMPT_RESERVE_TOKENS
