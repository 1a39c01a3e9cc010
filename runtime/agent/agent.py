"""The AgentFlow agent: query analysis, then {plan -> execute -> remember -> verify} turns, then an answer.

``Agent.run`` produces one ``Trajectory``: the memory of steps, every planner turn exactly as the
planner engine generated it, parse-failure and tool counters, and the final answer. Two budgets
bound a run: a number of turns (3 in training, 10 at evaluation, as in the paper) and a wall-clock
time; whichever ends the loop is recorded as the ``StopReason``, and the solution generator still
writes an answer so that every trajectory can be scored. A served request also bounds the answer's
generation (``answer_time_s``): when that runs out too, the answer is the last tool result.

A run answers a question or a chat ``Conversation`` (``conversation.py``): earlier turns seed the
memory as context for every module, instructions go to the planner and the generator.

The planner engine (the policy being trained) and the fixed engine (frozen modules: analysis,
executor, verifier, generator) may be different objects; on one machine they are usually the
same vLLM engine. ``run_many`` runs trajectories concurrently so that the engine batches their
requests instead of serving them one after another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import Step, StopReason, Trajectory, Verdict
from flowlane.runtime.agent.conversation import Conversation
from flowlane.runtime.agent.executor import Executor
from flowlane.runtime.agent.generator import SolutionGenerator
from flowlane.runtime.agent.memory import Memory
from flowlane.runtime.agent.parsing import Parsed
from flowlane.runtime.agent.planner import Planner, QueryAnalyzer
from flowlane.runtime.agent.prompts import Module
from flowlane.runtime.agent.verifier import Verifier
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.tools.base import Tool, ToolResult

log = logging.getLogger(__name__)
T = TypeVar("T")
#: ``Trajectory.answer_finish_reason`` when the time budget ended the answer's generation.
ANSWER_CUT_BY_TIME = "time_limit"
#: Where an answer written after conversation history ends: the start of an invented next turn.
HISTORY_TURN_STOP = "\nUser:"


@dataclass(frozen=True)
class AgentConfig:
    """Budgets and sampling of one agent. The defaults are the evaluation setting."""

    max_turns: int = 10
    # Turns before the verifier is first asked: a small verifier that stops after the first tool
    # result ends every multi-hop question one search short (turns below it always continue).
    min_turns: int = 1
    max_time_s: float = 300.0  # wall-clock budget of one trajectory, answer generation excluded
    answer_time_s: float | None = None  # the answer generation's own budget; None: unbounded
    tool_timeout_s: float = 30.0
    planner: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_tokens=256, temperature=0.0))
    fixed_temperature: float = 0.0
    analysis_max_tokens: int = 96
    executor_max_tokens: int = 192
    verifier_max_tokens: int = 96
    generator_max_tokens: int = 192
    generator_stop: tuple[str, ...] = ()  # the answer ends at the first of these (a chat request's stop)
    memory_result_chars: int = 400  # per tool result, in prompts
    memory_total_chars: int = 2000  # all steps, in prompts (older steps shrink to one line)
    max_concurrency: int = 64  # trajectories in flight in run_many

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ConfigError(f"min_turns must be between 1 and max_turns ({self.max_turns}), got {self.min_turns}")
        if self.max_time_s <= 0:
            raise ConfigError(f"max_time_s must be > 0, got {self.max_time_s}")
        if self.answer_time_s is not None and self.answer_time_s <= 0:
            raise ConfigError(f"answer_time_s must be > 0, got {self.answer_time_s}")
        if self.tool_timeout_s <= 0:
            raise ConfigError(f"tool_timeout_s must be > 0, got {self.tool_timeout_s}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @classmethod
    def for_training(cls, **overrides: object) -> AgentConfig:
        """The Flow-GRPO rollout setting: 3 turns, planner sampled at temperature 0.7."""
        base = cls(max_turns=3, planner=SamplingSettings(max_tokens=256, temperature=0.7))
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]

    def fixed_settings(self, max_tokens: int) -> SamplingSettings:
        return SamplingSettings(max_tokens=max_tokens, temperature=self.fixed_temperature)


@dataclass(frozen=True)
class AgentRequest:
    """One trajectory to run (``run_many``): the question and what to record with it."""

    question: str
    question_id: str = ""
    gold_answer: str | None = None
    seed: int | None = None


class AgentEventKind(StrEnum):
    """What just happened in a run; ``on_event`` callbacks get it with the trajectory and step."""

    ANALYSIS = "analysis"
    PLAN = "plan"
    COMMAND = "command"
    RESULT = "result"
    VERDICT = "verdict"
    ANSWER = "answer"


EventCallback = Callable[[AgentEventKind, Trajectory, Step | None], None]


class _TimeBudgetSpent(Exception):
    pass


class Agent:
    def __init__(
        self,
        planner_engine: LLMEngine,
        fixed_engine: LLMEngine,
        tools: Sequence[Tool],
        config: AgentConfig | None = None,
    ) -> None:
        if not tools:
            raise ConfigError("the agent needs at least one tool: pass tools such as python,search,generator")
        names = [tool.name for tool in tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"duplicate tool names {duplicates}: give each tool once")
        self.config = config or AgentConfig()
        self.tools = {tool.name: tool for tool in tools}
        self.cards = [tool.card() for tool in tools]
        cfg = self.config
        self.analyzer = QueryAnalyzer(fixed_engine, cfg.fixed_settings(cfg.analysis_max_tokens))
        self.planner = Planner(planner_engine, cfg.planner)
        self.executor = Executor(fixed_engine, cfg.fixed_settings(cfg.executor_max_tokens))
        self.verifier = Verifier(fixed_engine, cfg.fixed_settings(cfg.verifier_max_tokens))
        self.generator = SolutionGenerator(fixed_engine, cfg.fixed_settings(cfg.generator_max_tokens))

    # ------------------------------------------------------------------------------------------

    async def run(
        self,
        question: str | Conversation,
        *,
        question_id: str = "",
        gold_answer: str | None = None,
        seed: int | None = None,
        on_event: EventCallback | None = None,
    ) -> Trajectory:
        """One trajectory for ``question``, or for a chat ``Conversation`` ending in one.

        A conversation's earlier turns seed the memory and its instructions reach the planner and
        the generator (``conversation`` module); the trajectory records the last question only.
        """
        conversation = question if isinstance(question, Conversation) else Conversation(question)
        text = check_question(conversation.question)
        started = time.monotonic()
        deadline = started + self.config.max_time_s
        memory = Memory(max_result_chars=self.config.memory_result_chars,
                        max_total_chars=self.config.memory_total_chars, history=conversation.history)
        traj = Trajectory(question=text, question_id=question_id, gold_answer=gold_answer, steps=memory.steps)

        def emit(kind: AgentEventKind, step: Step | None = None) -> None:
            if on_event is not None:
                on_event(kind, traj, step)

        try:
            await self._loop(traj, memory, conversation.instructions, deadline, seed, emit)
        except _TimeBudgetSpent:
            traj.stop_reason = StopReason.TIME_BUDGET
        except FlowlaneError:
            raise  # an unreachable engine or a bad setting: the user must fix it, not the agent
        except Exception:
            # An engine or module failure ends the loop, not the trajectory: it is recorded and
            # the generator still tries to answer from what was gathered.
            log.exception("agent loop failed for question %r", question_id or text[:60])
            traj.stop_reason = StopReason.ERROR

        # After "User: ..." history lines a small model goes on writing the next turn itself.
        stop = self.config.generator_stop + ((HISTORY_TURN_STOP,) if conversation.history else ())
        answer = self.generator.answer(text, memory.render(), seed=seed, history=memory.render_history(),
                                       instructions=conversation.instructions, stop=stop)
        try:
            if self.config.answer_time_s is None:
                generation = await answer
            else:
                generation = await _within(deadline + self.config.answer_time_s, answer)
        except _TimeBudgetSpent:
            # The whole run's time is spent: answer with what the steps found, and say so.
            traj.stop_reason = StopReason.TIME_BUDGET
            traj.answer_finish_reason = ANSWER_CUT_BY_TIME
            traj.answer = _fallback_answer(memory, "(no answer: the time ran out before any step finished)")
        else:
            self._count(traj, generation)
            traj.answer_finish_reason = generation.finish_reason
            traj.answer = generation.text.strip() or _fallback_answer(memory)
            if not generation.text.strip():
                traj.count_parse_failure(Module.GENERATOR)
        traj.duration_s = time.monotonic() - started
        emit(AgentEventKind.ANSWER)
        return traj

    async def run_many(
        self, requests: Iterable[AgentRequest | str], *, concurrency: int | None = None
    ) -> list[Trajectory]:
        """Run trajectories concurrently (at most ``concurrency`` at once), results in input order."""
        items = [r if isinstance(r, AgentRequest) else AgentRequest(r) for r in requests]
        for item in items:
            check_question(item.question)
        limit = asyncio.Semaphore(concurrency or self.config.max_concurrency)

        async def one(item: AgentRequest) -> Trajectory:
            async with limit:
                return await self.run(item.question, question_id=item.question_id,
                                      gold_answer=item.gold_answer, seed=item.seed)

        return list(await asyncio.gather(*(one(item) for item in items)))

    # ------------------------------------------------------------------------------------------

    async def _loop(
        self,
        traj: Trajectory,
        memory: Memory,
        instructions: str,
        deadline: float,
        seed: int | None,
        emit: Callable[[AgentEventKind, Step | None], None],
    ) -> None:
        cfg = self.config
        question = traj.question
        history = memory.render_history()
        analysis = await _within(deadline, self.analyzer.analyze(question, self.cards, seed=seed, history=history))
        self._count(traj, analysis)
        traj.query_analysis = analysis.text.strip()
        emit(AgentEventKind.ANALYSIS, None)

        for turn in range(1, cfg.max_turns + 1):
            turn_started = time.monotonic()
            plan = await _within(deadline, self.planner.plan(
                question, traj.query_analysis, self.cards, memory.render(),
                turn=turn, max_turns=cfg.max_turns, seed=seed, history=history, instructions=instructions,
            ))
            self._count(traj, plan.generation)
            traj.planner_turns.append(plan.turn)
            self._note_parse(traj, Module.PLANNER, plan.parsed)
            step = Step(turn=turn, tool_name=plan.step.tool_name, sub_goal=plan.step.sub_goal,
                        context=plan.step.context, justification=plan.step.justification)
            memory.add(step)
            emit(AgentEventKind.PLAN, step)
            try:
                stop = await self._act_and_verify(traj, memory, step, deadline, seed, emit)
            except _TimeBudgetSpent:
                # Every planner turn keeps its step, so the record says how far the turn got.
                if not step.result:
                    step.tool_ok, step.result = False, "not run: the time budget was spent"
                step.verifier_reason = "time budget spent (verifier not asked)"
                raise
            finally:
                step.duration_s = time.monotonic() - turn_started
            if stop is not None:
                traj.stop_reason = stop
                return

    async def _act_and_verify(
        self,
        traj: Trajectory,
        memory: Memory,
        step: Step,
        deadline: float,
        seed: int | None,
        emit: Callable[[AgentEventKind, Step | None], None],
    ) -> StopReason | None:
        """Executor, tool, verifier for one planned step; the stop reason if the loop ends here."""
        cfg = self.config
        tool = self.tools[step.tool_name]
        command = await _within(deadline, self.executor.command_for(
            tool, traj.question, sub_goal=step.sub_goal, context=step.context, turn=step.turn, seed=seed,
            history=memory.render_history(),
        ))
        if command.generation is not None:
            self._count(traj, command.generation)
        if command.parsed is not None:
            self._note_parse(traj, Module.EXECUTOR, command.parsed)
        step.command = command.command
        emit(AgentEventKind.COMMAND, step)

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _TimeBudgetSpent
        result = await self.executor.execute(tool, step.command, timeout_s=min(cfg.tool_timeout_s, remaining))
        self._record_tool(traj, step, result)
        emit(AgentEventKind.RESULT, step)

        if step.turn == cfg.max_turns:  # the verifier's answer could not change anything
            step.verdict, step.verifier_reason = Verdict.STOP, "turn budget reached (verifier not asked)"
            emit(AgentEventKind.VERDICT, step)
            return StopReason.TURN_BUDGET
        if step.turn < cfg.min_turns:
            step.verdict, step.verifier_reason = Verdict.CONTINUE, f"below {cfg.min_turns} turns (verifier not asked)"
            emit(AgentEventKind.VERDICT, step)
            return None
        verdict = await _within(deadline, self.verifier.verify(
            traj.question, traj.query_analysis, memory.render(), turn=step.turn, seed=seed,
            history=memory.render_history(),
        ))
        self._count(traj, verdict.generation)
        self._note_parse(traj, Module.VERIFIER, verdict.parsed)
        step.verdict, step.verifier_reason = verdict.verdict, verdict.parsed.value.reason
        emit(AgentEventKind.VERDICT, step)
        return StopReason.VERIFIER_STOP if verdict.verdict is Verdict.STOP else None

    @staticmethod
    def _count(traj: Trajectory, generation: Generation) -> None:
        traj.generated_tokens += len(generation.token_ids)

    @staticmethod
    def _note_parse(traj: Trajectory, module: Module, parsed: Parsed[T]) -> None:
        if not parsed.clean:
            traj.count_parse_failure(module)
            log.info("%s output needed the %s fallback: %s", module, parsed.method, "; ".join(parsed.problems))

    @staticmethod
    def _record_tool(traj: Trajectory, step: Step, result: ToolResult) -> None:
        traj.tool_calls[step.tool_name] = traj.tool_calls.get(step.tool_name, 0) + 1
        step.tool_ok = result.ok
        if result.ok:
            step.result = result.output
        else:
            traj.tool_errors[step.tool_name] = traj.tool_errors.get(step.tool_name, 0) + 1
            reason = result.error or "error"
            step.result = result.output if result.output.startswith(f"[{reason}]") else f"[{reason}] {result.output}"


async def _within(deadline: float, work: Awaitable[T]) -> T:
    """``work``, cancelled with ``_TimeBudgetSpent`` if the trajectory's deadline passes first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(work):
            work.close()
        raise _TimeBudgetSpent
    try:
        async with asyncio.timeout(remaining):
            return await work
    except TimeoutError:
        raise _TimeBudgetSpent from None


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("the question is empty: pass the question text to answer")
    return question.strip()


def _fallback_answer(memory: Memory, nothing: str = "(no answer)") -> str:
    """The last successful tool result, when the generator wrote nothing (or had no time to)."""
    for step in reversed(memory.steps):
        if step.tool_ok and step.result.strip():
            return step.result.strip()
    return nothing
