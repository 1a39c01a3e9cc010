"""The AgentFlow agent loop.

Two kinds of tests:
- with the REAL bundled model through the session vLLM engine (``vllm_engine``) and the real
  tools: a full trajectory with a tool call and its training record, and the budgets;
- with ``ScriptedControlFlowEngine``, a fake engine that replies from a script, ONLY for control
  flow that a real model cannot be made to hit on demand (verifier STOP vs CONTINUE, garbage
  output for parse-failure counting, slow tools, concurrency).
And the ``solve`` command's bad-input errors through typer's CliRunner.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import typer
from rich.console import Console
from typer.testing import CliRunner

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.api.trajectory import Step, StopReason, Trajectory, Verdict
from flowlane.runtime.agent.agent import Agent, AgentConfig, AgentEventKind, AgentRequest
from flowlane.runtime.agent.commands import StepPrinter, solve
from flowlane.runtime.agent.conversation import (
    ChatTurn,
    Conversation,
    ConversationTooLong,
    Speaker,
    clip_turn,
    fit_conversation,
)
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.tools.base import Tool, ToolResult

# ============================================================================ real model (vLLM, CPU)

# Short fixed-module outputs keep each real trajectory to seconds; the planner keeps the
# training setting (temperature 0.7, 256 tokens, 3 turns).
REAL_CONFIG = AgentConfig.for_training(
    analysis_max_tokens=48, executor_max_tokens=96, verifier_max_tokens=64, generator_max_tokens=48
)
REAL_QUESTION = "What is 123 * 456? Compute it with Python."
real = pytest.mark.asyncio(loop_scope="session")


@dataclass
class RealRun:
    trajectory: Trajectory
    printed: str
    policy_version: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def real_run(vllm_engine: LLMEngine) -> RealRun:
    """One trajectory of the real agent: bundled model, real python and search tools."""
    from flowlane.runtime.tools.registry import build_tools

    tools = build_tools(["python", "search"], engine=vllm_engine)
    printed = io.StringIO()
    agent = Agent(vllm_engine, vllm_engine, tools, REAL_CONFIG)
    trajectory = await agent.run(REAL_QUESTION, question_id="q-mul", gold_answer="56088", seed=0,
                                 on_event=StepPrinter(Console(file=printed, width=200)))
    return RealRun(trajectory, printed.getvalue(), vllm_engine.policy_version)


@pytest.mark.vllm
@real
async def test_real_trajectory_executes_a_tool_and_records_its_result(real_run: RealRun) -> None:
    traj = real_run.trajectory
    assert 1 <= len(traj.steps) <= REAL_CONFIG.max_turns
    assert sum(traj.tool_calls.values()) == len(traj.steps)
    for step in traj.steps:
        assert step.tool_name in ("python", "search")
        assert step.sub_goal and step.command and step.result
    assert traj.stop_reason in (StopReason.VERIFIER_STOP, StopReason.TURN_BUDGET)
    assert (traj.question_id, traj.gold_answer) == ("q-mul", "56088")


@pytest.mark.vllm
@real
async def test_real_planner_turns_hold_ids_logprobs_and_version(real_run: RealRun) -> None:
    traj = real_run.trajectory
    assert len(traj.planner_turns) == len(traj.steps)
    for turn in traj.planner_turns:
        assert turn.prompt_ids and turn.response_ids
        assert len(turn.logprobs) == len(turn.response_ids)
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in turn.logprobs)
        assert turn.policy_version == real_run.policy_version
    # Later turns see earlier steps in their prompt: the prompt grows.
    lengths = [len(t.prompt_ids) for t in traj.planner_turns]
    assert lengths == sorted(lengths)


@pytest.mark.vllm
@real
async def test_real_planner_output_parses_cleanly_under_the_schema(real_run: RealRun) -> None:
    traj = real_run.trajectory
    assert all(turn.parsed for turn in traj.planner_turns)
    assert "planner" not in traj.parse_failures
    assert json.loads(traj.planner_turns[0].text)["tool_name"] == traj.steps[0].tool_name


@pytest.mark.vllm
@real
async def test_real_trajectory_has_an_answer_and_counts_tokens(real_run: RealRun) -> None:
    traj = real_run.trajectory
    assert traj.answer.strip()
    assert traj.generated_tokens > sum(len(t.response_ids) for t in traj.planner_turns)
    assert traj.duration_s > 0
    assert Trajectory.from_dict(json.loads(json.dumps(traj.to_dict()))) == traj


@pytest.mark.vllm
@real
async def test_step_printer_shows_plan_command_result_verdict_and_answer(real_run: RealRun) -> None:
    printed, first = real_run.printed, real_run.trajectory.steps[0]
    assert f"Turn 1 planner -> {first.tool_name}" in printed
    assert "command: " in printed and "result" in printed and "verifier: " in printed
    assert "Answer: " in printed


@pytest.mark.vllm
@real
async def test_real_turn_budget_of_one_stops_after_one_step(vllm_engine: LLMEngine) -> None:
    from flowlane.runtime.tools.registry import build_tools

    config = AgentConfig.for_training(max_turns=1, analysis_max_tokens=32, executor_max_tokens=64,
                                      generator_max_tokens=32)
    agent = Agent(vllm_engine, vllm_engine, build_tools(["python"], engine=vllm_engine), config)
    traj = await agent.run("What is 2 to the power of 10?", seed=1)
    assert traj.stop_reason is StopReason.TURN_BUDGET
    assert (len(traj.steps), len(traj.planner_turns), traj.tool_calls) == (1, 1, {"python": 1})
    assert traj.answer.strip()


@pytest.mark.vllm
@real
async def test_real_time_budget_cancels_the_loop_and_still_answers(vllm_engine: LLMEngine) -> None:
    from flowlane.runtime.tools.registry import build_tools

    config = AgentConfig.for_training(max_time_s=0.05, generator_max_tokens=16)
    agent = Agent(vllm_engine, vllm_engine, build_tools(["python"], engine=vllm_engine), config)
    traj = await agent.run("What is 2 to the power of 10?", seed=1)
    assert traj.stop_reason is StopReason.TIME_BUDGET
    assert traj.steps == [] and traj.planner_turns == []
    assert traj.answer.strip()


def test_planner_prompt_at_the_last_turn_with_five_tools_stays_under_1500_tokens(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from flowlane.kit.models import encode_chat
    from flowlane.runtime.agent.memory import render_steps
    from flowlane.runtime.agent.prompts import planner_messages
    from flowlane.runtime.tools.registry import available_tools, build_tools

    tools = build_tools(available_tools(), engine=scripted())
    assert len(tools) == 5
    steps = [Step(turn=i, tool_name="search", sub_goal="Find the administrative seat of Ardenmoor " * 3,
                  command="Ardenmoor seat", result="Ardenmoor is a province with 7 towns. " * 40)
             for i in range(1, 10)]
    config = AgentConfig()
    memory = render_steps(steps, max_result_chars=config.memory_result_chars,
                          max_total_chars=config.memory_total_chars)
    messages = planner_messages("In which province is the town where the author of The Long Ledger was born?",
                                "A two-hop question: find the author, then the birthplace. " * 8,
                                [t.card() for t in tools], memory, turn=10, max_turns=10)
    tokens = encode_chat(AutoTokenizer.from_pretrained(model_dir), messages)
    assert len(tokens) < 1500


# ============================================================================ scripted control flow

PLAN_JSON = '{"justification": "j", "context": "c", "sub_goal": "compute 6*7", "tool_name": "%s"}'
VERDICT_JSON = '{{"reason": "r", "conclusion": "{}"}}'


def module_of(messages: list[dict[str, str]]) -> str:
    """Which agent module sent ``messages``, from its system prompt."""
    system = messages[0]["content"]
    for key, module in (("analyze", "analysis"), ("planner", "planner"), ("command", "executor"),
                        ("check whether", "verifier"), ("answer questions", "generator")):
        if key in system:
            return module
    raise AssertionError(f"unknown module prompt: {system!r}")


class ScriptedControlFlowEngine(LLMEngine):
    """A fake engine for control-flow tests only: ``script[module]`` gives each reply's text.

    Token ids are the reply's characters' code points, log-probs -0.5 each, so tests can check
    that the planner turn holds exactly what the engine returned.
    """

    name = "scripted"
    supports_structured_output = True

    def __init__(self, script: dict[str, Callable[[int], str]], delay_s: float = 0.0) -> None:
        super().__init__()
        self.script = script
        self.delay_s = delay_s
        self.module_delay_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.settings_seen: dict[str, list[SamplingSettings]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        module = module_of(messages)
        n = self.calls.get(module, 0)
        self.calls[module] = n + 1
        self.settings_seen.setdefault(module, []).append(settings)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.module_delay_s.get(module, self.delay_s))
        finally:
            self.in_flight -= 1
        text = self.script.get(module, lambda i: "ok")(n)
        ids = [ord(c) for c in text]
        return Generation(prompt_ids=[1, 2, 3, n], token_ids=ids, logprobs=[-0.5] * len(ids), text=text,
                          policy_version=self.policy_version)


class RecordingTool(Tool):
    """A fake tool that records its commands and answers after ``delay_s``."""

    def __init__(self, name: str = "python", *, delay_s: float = 0.0, needs_command: bool = True,
                 fail: BaseException | None = None) -> None:
        self.name = name
        self.description = f"{name} tool"
        self.needs_command = needs_command
        self.delay_s = delay_s
        self.fail = fail
        self.commands: list[str] = []

    async def execute(self, command: str) -> ToolResult:
        self.commands.append(command)
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return ToolResult(output=f"ran {command}")


def scripted(verdicts: str = "CONTINUE", tool: str = "python", **overrides: Callable[[int], str]
             ) -> ScriptedControlFlowEngine:
    script: dict[str, Callable[[int], str]] = {
        "analysis": lambda i: "Needs arithmetic.",
        "planner": lambda i: PLAN_JSON % tool,
        "executor": lambda i: '{"command": "print(6*7)"}',
        "verifier": lambda i: VERDICT_JSON.format(verdicts.split(",")[min(i, verdicts.count(","))]),
        "generator": lambda i: "42",
    }
    script.update(overrides)
    return ScriptedControlFlowEngine(script)


async def test_turn_budget_stops_after_max_turns_and_still_answers() -> None:
    engine = scripted("CONTINUE")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=3))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.TURN_BUDGET
    assert [s.turn for s in traj.steps] == [1, 2, 3]
    assert len(traj.planner_turns) == 3
    assert engine.calls["verifier"] == 2  # not asked at the last turn: it could not change anything
    assert traj.steps[-1].verdict is Verdict.STOP
    assert traj.answer == "42"


async def test_verifier_stop_ends_the_loop() -> None:
    engine = scripted("CONTINUE,STOP")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=10))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.VERIFIER_STOP
    assert [s.verdict for s in traj.steps] == [Verdict.CONTINUE, Verdict.STOP]
    assert traj.steps[1].verifier_reason == "r"


async def test_a_turn_floor_keeps_the_verifier_from_stopping_before_it() -> None:
    engine = scripted("STOP")  # a verifier that stops at every chance
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=4, min_turns=3))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.VERIFIER_STOP
    assert [s.verdict for s in traj.steps] == [Verdict.CONTINUE, Verdict.CONTINUE, Verdict.STOP]
    assert engine.calls["verifier"] == 1  # first asked after turn 3
    assert traj.steps[0].verifier_reason == "below 3 turns (verifier not asked)"
    assert traj.answer == "42"


@pytest.mark.parametrize("min_turns", [0, 4])
def test_a_turn_floor_outside_one_to_the_budget_is_a_config_error(min_turns: int) -> None:
    with pytest.raises(ConfigError, match=f"min_turns must be between 1 and max_turns \\(3\\), got {min_turns}"):
        AgentConfig(max_turns=3, min_turns=min_turns)


async def test_time_budget_cuts_a_slow_tool_and_still_answers() -> None:
    engine = scripted("CONTINUE")
    tool = RecordingTool(delay_s=30)
    agent = Agent(engine, engine, [tool], AgentConfig(max_turns=10, max_time_s=0.5, tool_timeout_s=20))
    started = time.monotonic()
    traj = await agent.run("What is 6*7?")
    assert time.monotonic() - started < 3
    assert traj.stop_reason is StopReason.TIME_BUDGET
    assert len(traj.steps) == 1
    assert traj.steps[0].tool_ok is False
    assert traj.steps[0].result.startswith("[timeout]")
    assert traj.tool_errors == {"python": 1}
    assert traj.answer == "42"


async def test_time_budget_cuts_a_slow_engine_call() -> None:
    engine = scripted("CONTINUE")
    engine.delay_s = 0.3
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=10, max_time_s=1.0))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.TIME_BUDGET
    assert 1 <= len(traj.steps) <= 2
    assert traj.answer == "42"


async def test_time_budget_spent_while_writing_the_command_leaves_the_tool_unrun() -> None:
    engine = scripted("CONTINUE")
    engine.module_delay_s["executor"] = 5
    tool = RecordingTool()
    agent = Agent(engine, engine, [tool], AgentConfig(max_time_s=0.3))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.TIME_BUDGET
    assert (len(traj.planner_turns), tool.commands, traj.tool_calls) == (1, [], {})
    (step,) = traj.steps
    assert (step.tool_ok, step.result) == (False, "not run: the time budget was spent")
    assert step.verifier_reason == "time budget spent (verifier not asked)"


async def test_tool_timeout_is_a_tool_error_not_a_stop() -> None:
    engine = scripted("CONTINUE,STOP")
    agent = Agent(engine, engine, [RecordingTool(delay_s=5)], AgentConfig(tool_timeout_s=0.1))
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.VERIFIER_STOP
    assert traj.tool_calls == {"python": 2}
    assert traj.tool_errors == {"python": 2}


async def test_parse_failures_are_counted_per_module_and_mark_planner_turns() -> None:
    engine = scripted(
        "CONTINUE",
        planner=lambda i: ["Sub-Goal: compute\nTool Name: python", PLAN_JSON % "python", "garbage"][i],
        verifier=lambda i: ["hmm", '{"reason": "r", "conclusion": "CONTINUE"}'][i],
        executor=lambda i: "print(1)",
    )
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=3))
    traj = await agent.run("What is 6*7?")
    assert [t.parsed for t in traj.planner_turns] == [False, True, False]
    assert traj.parse_failures == {"planner": 2, "verifier": 1, "executor": 3}


async def test_planner_turn_holds_the_engine_lists_exactly() -> None:
    engine = scripted("STOP")
    engine.policy_version = 7
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig())
    traj = await agent.run("What is 6*7?")
    (turn,) = traj.planner_turns
    text = PLAN_JSON % "python"
    assert turn.response_ids == [ord(c) for c in text]
    assert turn.logprobs == [-0.5] * len(text)
    assert turn.prompt_ids == [1, 2, 3, 0]
    assert (turn.policy_version, turn.text, turn.parsed) == (7, text, True)


async def test_planner_and_fixed_modules_use_their_own_engines() -> None:
    planner_engine = scripted("STOP")
    fixed_engine = scripted("STOP")
    agent = Agent(planner_engine, fixed_engine, [RecordingTool()], AgentConfig())
    await agent.run("What is 6*7?")
    assert planner_engine.calls == {"planner": 1}
    assert fixed_engine.calls == {"analysis": 1, "executor": 1, "verifier": 1, "generator": 1}


async def test_structured_output_schemas_are_requested() -> None:
    engine = scripted("STOP", tool="search")
    agent = Agent(engine, engine, [RecordingTool("python"), RecordingTool("search")], AgentConfig())
    await agent.run("Who wrote Hamlet?")
    planner_schema = engine.settings_seen["planner"][0].json_schema
    assert planner_schema is not None and planner_schema["properties"]["tool_name"]["enum"] == ["python", "search"]
    verifier_schema = engine.settings_seen["verifier"][0].json_schema
    assert verifier_schema is not None and verifier_schema["properties"]["conclusion"]["enum"] == ["STOP", "CONTINUE"]
    assert engine.settings_seen["generator"][0].json_schema is None


async def test_no_schema_is_sent_to_an_engine_without_structured_output() -> None:
    engine = scripted("STOP")
    engine.supports_structured_output = False
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig())
    await agent.run("What is 6*7?")
    assert all(s.json_schema is None for seen in engine.settings_seen.values() for s in seen)


async def test_tool_without_command_gets_the_sub_goal_and_no_executor_call() -> None:
    engine = scripted("STOP")
    tool = RecordingTool(needs_command=False)
    agent = Agent(engine, engine, [tool], AgentConfig())
    traj = await agent.run("What is 6*7?")
    assert tool.commands == ["compute 6*7"]
    assert "executor" not in engine.calls
    assert traj.steps[0].command == "compute 6*7"


async def test_tool_exception_becomes_a_recorded_tool_error() -> None:
    engine = scripted("STOP")
    agent = Agent(engine, engine, [RecordingTool(fail=RuntimeError("boom"))], AgentConfig())
    traj = await agent.run("What is 6*7?")
    assert traj.steps[0].tool_ok is False
    assert traj.steps[0].result == "[RuntimeError] tool 'python' failed: RuntimeError: boom"
    assert (traj.tool_calls, traj.tool_errors) == ({"python": 1}, {"python": 1})


async def test_seeded_run_sends_distinct_seeds_per_call() -> None:
    engine = scripted("CONTINUE")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=2))
    await agent.run("What is 6*7?", seed=5)
    seeds = [s.seed for seen in engine.settings_seen.values() for s in seen]
    assert None not in seeds
    assert len(set(seeds)) == len(seeds)


async def test_generated_tokens_count_every_module() -> None:
    engine = scripted("STOP")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig())
    traj = await agent.run("What is 6*7?")
    expected = sum(map(len, ["Needs arithmetic.", PLAN_JSON % "python", '{"command": "print(6*7)"}',
                             '{"reason": "r", "conclusion": "STOP"}', "42"]))
    assert traj.generated_tokens == expected


async def test_events_arrive_in_loop_order() -> None:
    engine = scripted("STOP")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig())
    seen: list[AgentEventKind] = []
    await agent.run("What is 6*7?", on_event=lambda kind, traj, step: seen.append(kind))
    assert seen == [AgentEventKind.ANALYSIS, AgentEventKind.PLAN, AgentEventKind.COMMAND, AgentEventKind.RESULT,
                    AgentEventKind.VERDICT, AgentEventKind.ANSWER]


async def test_run_many_overlaps_trajectories_up_to_the_bound_and_keeps_order() -> None:
    engine = scripted("STOP")
    engine.delay_s = 0.05
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig())
    trajs = await agent.run_many([AgentRequest(f"q{i}", question_id=str(i)) for i in range(6)], concurrency=3)
    assert [t.question_id for t in trajs] == [str(i) for i in range(6)]
    assert engine.max_in_flight == 3


class FailingPlannerEngine(ScriptedControlFlowEngine):
    """A scripted engine whose planner call raises ``error`` (control-flow test only)."""

    def __init__(self, error: Exception) -> None:
        super().__init__({})
        self.error = error

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        raise self.error


async def test_module_failure_ends_the_loop_with_error_and_still_answers() -> None:
    fixed = scripted("STOP")
    agent = Agent(FailingPlannerEngine(RuntimeError("kernel died")), fixed, [RecordingTool()], AgentConfig())
    traj = await agent.run("What is 6*7?")
    assert traj.stop_reason is StopReason.ERROR
    assert (traj.steps, traj.answer) == ([], "42")


async def test_unreachable_engine_error_reaches_the_caller() -> None:
    fixed = scripted("STOP")
    agent = Agent(FailingPlannerEngine(EngineUnavailableError("cannot reach it")), fixed, [RecordingTool()])
    with pytest.raises(EngineUnavailableError, match="cannot reach it"):
        await agent.run("What is 6*7?")


async def test_empty_question_is_a_config_error() -> None:
    engine = scripted()
    agent = Agent(engine, engine, [RecordingTool()])
    with pytest.raises(ConfigError, match="question is empty"):
        await agent.run("   ")


def test_duplicate_tool_names_are_a_config_error() -> None:
    engine = scripted()
    with pytest.raises(ConfigError, match=r"duplicate tool names \['python'\]"):
        Agent(engine, engine, [RecordingTool(), RecordingTool()])


def test_trajectory_json_round_trips() -> None:
    engine = scripted("CONTINUE")
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=2))
    traj = asyncio.run(agent.run("What is 6*7?"))
    assert Trajectory.from_dict(json.loads(json.dumps(traj.to_dict()))) == traj


# ============================================================================ CLI bad input


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(solve)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["  "], "error: the question is empty"),
        (["What is 2+2?", "--tools", "python,calculator"], "calculator"),
        (["What is 2+2?", "--tools", " , "], "error: no tools given"),
        (["What is 2+2?", "--engine", "tpu"], "tpu"),
        (["What is 2+2?", "--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
        (["What is 2+2?", "--max-turns", "0"], "max_turns"),
        (["What is 2+2?", "--fixed", "/nonexistent/fixed-dir"], "/nonexistent/fixed-dir"),
    ],
    ids=["empty-question", "unknown-tool", "no-tools", "bad-engine", "missing-model", "zero-turns", "missing-fixed"],
)
def test_solve_bad_input_is_a_one_line_error_with_exit_code_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_solve_with_an_unreachable_engine_is_a_one_line_error() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["What is 2+2?", "--engine", "openai", "--endpoint", f"http://127.0.0.1:{port}/v1", "--tools", "python"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach") and str(port) in lines[0]


# ============================================================================ conversations

def words(text: str) -> int:
    """A token counter for exact expectations: one token per word."""
    return len(text.split())


def chat(*turns: str) -> tuple[ChatTurn, ...]:
    """Alternating user/assistant turns, user first."""
    return tuple(ChatTurn(Speaker.USER if i % 2 == 0 else Speaker.ASSISTANT, text) for i, text in enumerate(turns))


class MessageRecordingEngine(ScriptedControlFlowEngine):
    """``scripted`` that also keeps every prompt by module."""

    def __init__(self, base: ScriptedControlFlowEngine) -> None:
        super().__init__(base.script)
        self.prompts: dict[str, list[str]] = {}

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        text = "\n".join(message["content"] for message in messages)
        self.prompts.setdefault(module_of(messages), []).append(text)
        return await super().chat(messages, settings)


HISTORY = chat("What is 17 * 23?", "17 * 23 = 391.")


async def test_earlier_turns_reach_every_module_prompt() -> None:
    engine = MessageRecordingEngine(scripted("STOP"))
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=2))
    traj = await agent.run(Conversation("Now divide that by 17.", history=HISTORY))
    assert sorted(engine.prompts) == ["analysis", "executor", "generator", "planner", "verifier"]
    for module, prompts in engine.prompts.items():
        assert "User: What is 17 * 23?\nAssistant: 17 * 23 = 391." in prompts[-1], module
    assert traj.question == "Now divide that by 17."


async def test_instructions_reach_the_planner_and_the_generator_only() -> None:
    engine = MessageRecordingEngine(scripted("STOP"))
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=2))
    await agent.run(Conversation("What is 6 * 7?", instructions="Answer in French."))
    told = sorted(module for module, prompts in engine.prompts.items() if "Answer in French." in prompts[-1])
    assert told == ["generator", "planner"]


async def test_a_run_without_a_conversation_sends_the_same_prompts_as_a_bare_question() -> None:
    bare, wrapped = MessageRecordingEngine(scripted("STOP")), MessageRecordingEngine(scripted("STOP"))
    await Agent(bare, bare, [RecordingTool()], AgentConfig(max_turns=1)).run("What is 6 * 7?")
    await Agent(wrapped, wrapped, [RecordingTool()], AgentConfig(max_turns=1)).run(Conversation("What is 6 * 7?"))
    assert bare.prompts == wrapped.prompts
    assert all("Conversation so far" not in p for prompts in bare.prompts.values() for p in prompts)


async def test_an_answer_after_history_stops_before_an_invented_next_turn() -> None:
    engine = scripted("STOP")
    await Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=1, generator_stop=("END",))).run(
        Conversation("Now divide that by 17.", history=HISTORY))
    assert engine.settings_seen["generator"][-1].stop == ("END", "\nUser:")


def test_oldest_turns_are_dropped_until_the_conversation_fits() -> None:
    conversation = Conversation("q one", instructions="be brief", history=chat("a b c", "d e", "f g h i", "j"))
    # fixed: 2 + 2 = 4 words; turns cost words + 3: 6, 5, 7, 4 -> drop the first two (user, assistant)
    fitted = fit_conversation(conversation, max_tokens=4 + 7 + 4, count=words)
    assert fitted.history == chat("f g h i", "j")
    assert fitted.dropped_turns == 2


def test_history_kept_after_a_drop_starts_with_a_user_turn() -> None:
    conversation = Conversation("q", history=chat("a b c d e f", "g", "h", "i"))
    # turn costs 9, 4, 4, 4; the cap keeps the last three, which start with an assistant turn
    fitted = fit_conversation(conversation, max_tokens=1 + 12, count=words)
    assert fitted.history == chat("h", "i")
    assert fitted.dropped_turns == 2


def test_a_conversation_that_fits_is_returned_unchanged() -> None:
    conversation = Conversation("q", history=chat("a", "b"))
    assert fit_conversation(conversation, max_tokens=100, count=words) is conversation


def test_instructions_and_question_over_the_cap_cannot_be_served() -> None:
    with pytest.raises(ConversationTooLong) as caught:
        fit_conversation(Conversation("one two three", instructions="four five"), max_tokens=4, count=words)
    assert (caught.value.tokens, caught.value.max_tokens) == (5, 4)
    assert "5 tokens" in str(caught.value) and "at most 4" in str(caught.value)


def test_long_turns_keep_their_beginning_and_end() -> None:
    text = "start " + "x" * 5000 + " end"
    clipped = clip_turn(text, 100)
    assert len(clipped) <= 100 and clipped.startswith("start ") and clipped.endswith(" end")


# ============================================================================ answer budgets

async def test_answer_time_budget_cuts_the_answer_and_falls_back_to_the_last_result() -> None:
    """The answer may use what the loop left of max_time_s, plus answer_time_s: 0.8 s here."""
    engine = scripted("STOP")
    engine.module_delay_s["generator"] = 5.0
    agent = Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=1, max_time_s=0.5, answer_time_s=0.3))
    started = time.monotonic()
    traj = await agent.run("What is 6 * 7?")
    assert 0.7 < time.monotonic() - started < 2.0
    assert engine.in_flight == 0  # the answer's generation was cancelled, not left running
    assert (traj.stop_reason, traj.answer_finish_reason, traj.answer) == (
        StopReason.TIME_BUDGET, "time_limit", "ran print(6*7)")


async def test_the_answers_finish_reason_is_recorded() -> None:
    class LengthEngine(ScriptedControlFlowEngine):
        async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
            generation = await super().chat(messages, settings)
            if module_of(messages) == "generator":
                generation.finish_reason = "length"
            return generation

    engine = LengthEngine(scripted("STOP").script)
    traj = await Agent(engine, engine, [RecordingTool()], AgentConfig(max_turns=1)).run("What is 6 * 7?")
    assert traj.answer_finish_reason == "length"
