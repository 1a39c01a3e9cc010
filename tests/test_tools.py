"""Tools: python (through the real sandbox), search (real BM25), generator, networked plug-ins
(against a real HTTP server on loopback), and the registry."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from flowlane.api.errors import ConfigError
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxResult
from flowlane.runtime.sandbox.runner import LocalCodeRunner
from flowlane.runtime.tools import (
    GeneratorTool,
    PythonTool,
    SearchTool,
    WebSearchTool,
    WikipediaSearchTool,
    available_tools,
    build_tools,
    check_tool_names,
)
from flowlane.runtime.tools.python_tool import extract_code, print_last_expression
from flowlane.runtime.tools.search_tool import corpus_index


class ScriptedEngine(LLMEngine):
    name = "scripted"

    def __init__(self, reply: str = "", error: Exception | None = None) -> None:
        super().__init__()
        self.reply, self.error = reply, error
        self.requests: list[list[dict[str, str]]] = []

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        self.requests.append(messages)
        if self.error:
            raise self.error
        return Generation([], [], [], self.reply)

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        raise NotImplementedError


class RecordingRunner:
    """A CodeRunner that records what it was asked to run and answers a fixed result."""

    def __init__(self, result: SandboxResult | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, SandboxLimits | None]] = []
        self.result, self.error = result, error

    async def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        self.calls.append((code, limits))
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


# -- python ------------------------------------------------------------------------------------


async def test_python_tool_returns_what_the_program_prints() -> None:
    result = await PythonTool().execute("print(17 * 23)")
    assert (result.ok, result.output, result.error) == (True, "391", "")
    assert result.details["exit_code"] == 0


async def test_python_tool_prints_a_final_bare_expression_inside_a_fence() -> None:
    result = await PythonTool().execute("Here you go:\n```python\nx = 12\nx ** 2\n```")
    assert (result.ok, result.output) == (True, "144")


async def test_python_tool_reports_the_error_kind_and_the_traceback_tail() -> None:
    result = await PythonTool().execute("def f():\n    return 1 / 0\nf()")
    assert (result.ok, result.error) == (False, "error")
    assert result.output.startswith("error: exit code 1: ZeroDivisionError: division by zero\nstderr:\n")
    assert "return 1 / 0" in result.output


async def test_python_tool_reports_a_timeout() -> None:
    tool = PythonTool(limits=SandboxLimits(wall_time_s=1))
    result = await tool.execute("import time\ntime.sleep(30)")
    assert (result.ok, result.error, result.output) == (False, "timeout", "timeout: wall-clock limit of 1s")


async def test_python_tool_says_when_nothing_was_printed() -> None:
    result = await PythonTool().execute("x = 5")
    assert (result.ok, result.output) == (True, "(the program printed nothing; print the result)")


async def test_python_tool_passes_its_limits_and_the_prepared_code_to_the_runner() -> None:
    limits = SandboxLimits(cpu_time_s=2)
    runner = RecordingRunner(SandboxResult("6\n", "", 0, True))
    result = await PythonTool(runner, limits).execute("```py\n2 * 3\n```")
    assert runner.calls == [("print(2 * 3)", limits)]
    assert result.output == "6"


async def test_python_tool_turns_a_runner_failure_into_a_tool_error() -> None:
    result = await PythonTool(RecordingRunner(error=ConnectionError("sandbox gone"))).execute("print(1)")
    assert (result.ok, result.error) == (False, "runner")
    assert result.output == "the code runner failed: ConnectionError: sandbox gone"


async def test_python_tool_refuses_an_empty_command() -> None:
    result = await PythonTool(RecordingRunner()).execute("```python\n```")
    assert (result.ok, result.error) == (False, "empty command")


def test_python_tool_metadata_states_output_network_and_limits() -> None:
    tool = PythonTool(limits=SandboxLimits(cpu_time_s=3, wall_time_s=6, memory_bytes=512 * 1024 * 1024))
    assert tool.name == "python" and tool.needs_command
    assert tool.metadata["limitations"] == (
        "no network and no outside files; 3 s CPU, 6 s wall clock, 512 MiB memory, 64 KiB output"
    )
    assert "print" in tool.metadata["output"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [("x = 3\nx * 2", "x = 3\nprint(x * 2)"), ("print(1)", "print(1)"), ("x = 1; x", "x = 1; x"),
     ("f()  # go", "print(f())  # go"), ("for i in range(2):\n    i", "for i in range(2):\n    i"),
     ("x = (", "x = (")],
)  # fmt: skip
def test_print_last_expression(code: str, expected: str) -> None:
    assert print_last_expression(code) == expected


def test_extract_code_takes_the_first_fenced_block() -> None:
    assert extract_code("a\n```python\nprint(1)\n```\nb\n```\nprint(2)\n```") == "print(1)"


# -- search ------------------------------------------------------------------------------------


async def test_search_returns_top_k_passages_with_titles() -> None:
    result = await SearchTool(k=2).execute("Drumlin Pharmaceuticals")
    lines = result.output.splitlines()
    assert result.ok and len(lines) == 2 and len(result.details["passage_ids"]) == 2
    assert lines[0].startswith("[1] Drumlin Pharmaceuticals: Drumlin Pharmaceuticals is a company that")


async def test_search_reports_no_match_without_failing() -> None:
    result = await SearchTool().execute("zzzqqq")
    assert (result.ok, result.output) == (True, "no passage matches 'zzzqqq'; try other keywords")


async def test_search_refuses_an_empty_query() -> None:
    assert (await SearchTool().execute("  ")).error == "empty command"


def test_search_index_is_built_once_per_corpus() -> None:
    SearchTool()
    assert corpus_index() is corpus_index()


async def test_search_over_a_custom_corpus_rebuilds_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"id": "a", "title": "Alpha", "text": "The alpha passage about otters."}) + "\n")
    tool = SearchTool(path)
    assert (await tool.execute("otters")).details["passage_ids"] == ["a"]
    path.write_text(json.dumps({"id": "b", "title": "Beta", "text": "Beavers build dams and lodges."}) + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock resolution
    assert (await tool.execute("beavers")).details["passage_ids"] == ["b"]


def test_search_with_a_missing_corpus_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search corpus .*nope\.jsonl: no such file"):
        SearchTool(tmp_path / "nope.jsonl")


def test_search_corpus_line_without_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected a JSON object with 'text'"):
        SearchTool(path)


# -- generator ---------------------------------------------------------------------------------


async def test_generator_sends_the_sub_goal_to_the_engine() -> None:
    engine = ScriptedEngine("Paris.")
    tool = GeneratorTool(engine)
    result = await tool.execute("Name the capital of France.")
    assert not tool.needs_command
    assert (result.ok, result.output) == (True, "Paris.")
    assert engine.requests[0][-1] == {"role": "user", "content": "Name the capital of France."}


async def test_generator_turns_an_engine_failure_into_a_tool_error() -> None:
    result = await GeneratorTool(ScriptedEngine(error=RuntimeError("engine died"))).execute("hi")
    assert (result.ok, result.error, result.output) == (False, "engine", "the model failed: RuntimeError: engine died")


# -- networked plug-ins ------------------------------------------------------------------------


@pytest.fixture
def json_server() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    """A loopback HTTP server answering SearxNG and MediaWiki-shaped JSON; records query strings."""
    seen: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)
            seen.append(query)
            body: dict[str, object]
            if "format" in query and "q" in query:
                body = {"results": [{"title": "Otters", "url": "http://x/otters", "content": "<b>Otters</b> swim."}]}
            elif query.get("list") == ["search"]:
                body = {"query": {"search": [{"title": "Otter", "snippet": "An <span>otter</span>"}]}}
            else:
                body = {"query": {"pages": {"1": {"title": "Otter", "extract": "Otters are semiaquatic mammals."}}}}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("tool_class", "variable"),
    [(WebSearchTool, "FLOWLANE_WEB_SEARCH_URL"), (WikipediaSearchTool, "FLOWLANE_WIKIPEDIA_API_URL")],
)
async def test_unconfigured_networked_tool_says_what_to_set(
    tool_class: type[WebSearchTool], variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    tool = tool_class()
    result = await tool.execute("otters")
    assert (result.ok, result.error) == (False, f"not configured: set {variable}")
    assert result.output.startswith(f"{tool.name} is not configured: set {variable} (")
    assert tool._client is None  # no HTTP client was ever made
    assert tool.card()["configured"] is False


async def test_web_search_queries_the_configured_endpoint(
    json_server: tuple[str, list[dict[str, list[str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = json_server
    monkeypatch.setenv("FLOWLANE_WEB_SEARCH_URL", url)
    tool = WebSearchTool()
    try:
        result = await tool.execute("otters")
    finally:
        await tool.close()
    assert (result.ok, result.output) == (True, "[1] Otters (http://x/otters): Otters swim.")
    assert seen == [{"q": ["otters"], "format": ["json"]}]


async def test_wikipedia_search_returns_article_introductions(
    json_server: tuple[str, list[dict[str, list[str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = json_server
    monkeypatch.setenv("FLOWLANE_WIKIPEDIA_API_URL", url)
    tool = WikipediaSearchTool()
    try:
        result = await tool.execute("otter")
    finally:
        await tool.close()
    assert (result.ok, result.output) == (True, "[1] Otter: Otters are semiaquatic mammals.")
    assert [q["srsearch"] if "srsearch" in q else q["titles"] for q in seen] == [["otter"], ["Otter"]]


async def test_unreachable_endpoint_is_a_tool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket is closed
    monkeypatch.setenv("FLOWLANE_WEB_SEARCH_URL", f"http://127.0.0.1:{port}/search")
    tool = WebSearchTool()
    try:
        result = await tool.execute("otters")
    finally:
        await tool.close()
    assert (result.ok, result.error) == (False, "unreachable")


# -- registry ----------------------------------------------------------------------------------


def test_available_tools() -> None:
    assert available_tools() == ["python", "search", "generator", "web_search", "wikipedia_search"]


def test_build_tools_in_order_with_the_given_runner_and_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "alpha"}\n')
    runner = LocalCodeRunner()
    engine = ScriptedEngine()
    tools = build_tools(["search", "python", "generator"], engine=engine, code_runner=runner, corpus_path=corpus)
    assert [t.name for t in tools] == ["search", "python", "generator"]
    search, python, generator = tools
    assert isinstance(search, SearchTool) and search.corpus_path == corpus
    assert isinstance(python, PythonTool) and python.runner is runner
    assert isinstance(generator, GeneratorTool) and generator.engine is engine


def test_unknown_tool_names_the_available_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        build_tools(["python", "calculator"], engine=ScriptedEngine())
    assert str(caught.value) == (
        "unknown tool 'calculator'; available: python, search, generator, web_search, wikipedia_search"
    )


def test_a_tool_listed_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="tool 'python' is listed twice"):
        check_tool_names(["python", "python"])
